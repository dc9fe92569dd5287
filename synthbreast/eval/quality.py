"""A cheap quality check of generated images against real ones, and the collapse verdict.

Used three times, with one feature space and one set of thresholds:
- during training, at every snapshot (as StyleGAN does with fid50k): `metric-texture.jsonl`;
- by `generate`, before it writes anything: a collapsed generator is announced loudly, and the
  verdict goes into the synthetic manifest, where `pipeline` and `report` read it;
- by `fidelity`, as the `texture` extractor beside the others.

The feature space (`texture`): a fixed, seeded, randomly initialised 4-layer conv net at 64 px,
each layer summarised by the mean AND the standard deviation of every channel over the image,
plus the pixels' own per-channel mean and std. Random conv features are a known, reasonable
texture descriptor (the std pools are Gram-like statistics), they need no download, the same
seed gives the same net on every machine, and they cost ~7 ms per image on one CPU core. A flat
colour has zero spatial std in every channel of every layer: it lands far from real tissue, and
a set of identical images has zero spread.
Grey (1-channel) images are replicated to 3 equal channels at the net's input, the way every
extractor here reads grey (synthbreast/eval/features.py, `as_rgb`): a grey mammogram and its
RGB copy give the same features.

Figures (keys of `quality_metrics`):
- `kid`: KID (x1000) between the two feature sets (unbiased MMD^2, polynomial kernel);
- `precision`, `recall`, `coverage`: Naeem et al. 2020 with k = 5;
- `diversity`: mean pairwise distance of the generated features over that of the real ones;
  1 = as varied as the real images, 0 = one image repeated;
- `class_accuracy` (a model of several classes, training's snapshot metric): the share of a
  class's fakes that a classifier fitted on the real reference features assigns to that
  class (Shmelkov et al. 2018's GAN-test, in this feature space); their mean over classes is
  the balanced accuracy of that real-trained classifier on the fakes. 1/classes: the
  generator's classes carry nothing of the real classes' look; recall and KID cannot see
  that, since they compare each class with its own real images only. The classifier's own
  balanced accuracy on held-out real images (half of the reference, other images of the same
  patients, so optimistic) is `real_class_accuracy`.
- `synth_real_accuracy` (the same models): the other direction, the pipeline's synth-real
  scenario in miniature (Ravuri & Vinyals 2019's classification accuracy score): a classifier
  fitted on the fakes of every class labels the real reference images; per class the share of
  its real images labelled right, their mean the balanced accuracy. A generator whose classes
  are easy to tell apart but unlike the real ones scores high on class_accuracy and low here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEXTURE_SIDE = 64
TEXTURE_SEED = 1234
TEXTURE_WIDTHS = (32, 64, 128, 256)
TEXTURE_VERSION = 1  # bump when the net or its pooling changes (it is part of cache keys)
NEAREST_K = 5

# Collapse thresholds, from real-vs-real figures in this feature space, measured on the real
# IDC sample (40 patients; the GAN pool against the test and the train pool, different
# patients, per class): diversity 0.65-1.07, recall 0.86-0.98, precision 0.90-0.98. One flat
# colour scores diversity 0.00 and recall 0.00 (and precision 0.00). The thresholds sit far
# below every real-vs-real figure, so a real-looking set never trips them, and far above a
# collapsed one: diversity under 0.25 (a quarter of the real spread) or recall under 0.05
# (the fakes reach fewer than 1 in 20 real images' neighbourhoods) is collapse.
COLLAPSE_DIVERSITY = 0.25
COLLAPSE_RECALL = 0.05
REAL_REFERENCE = 2000  # real images per class a generator is compared with, at most


class TextureNet(nn.Module):
    """Fixed random conv features: [B, 3, H, W] in [-1, 1] -> [B, dim]."""

    def __init__(self, seed: int = TEXTURE_SEED) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers, channels = [], 3
        for i, width in enumerate(TEXTURE_WIDTHS):
            conv = nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():  # He init from our own generator: the same net everywhere
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=generator)
                    * math.sqrt(2 / (channels * 9))
                )
                conv.bias.zero_()
            layers.append(conv)
            channels = width
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False).eval()

    @property
    def dim(self) -> int:
        return 2 * (3 + sum(TEXTURE_WIDTHS))

    def forward(self, x: Tensor) -> Tensor:
        x = as_rgb(x.float())
        if x.shape[-2:] != (TEXTURE_SIDE, TEXTURE_SIDE):
            x = F.interpolate(x, size=(TEXTURE_SIDE, TEXTURE_SIDE), mode="bilinear",
                              align_corners=False, antialias=True)  # fmt: skip
        pooled = [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        for conv in self.layers:
            x = F.relu(conv(x))
            pooled += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        return torch.cat(pooled, dim=1)


def as_rgb(images: Tensor) -> Tensor:
    """[B, 1, H, W] grey -> [B, 3, H, W], the grey in every channel; RGB as it is. The one
    rule by which every feature extractor reads 1-channel images (mammograms)."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images


def uint8_to_unit(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] -> float in [-1, 1], the generator's range."""
    return images.float().div(127.5).sub(1.0)


@torch.no_grad()
def texture_features(net: TextureNet, images: Tensor, batch: int = 256) -> Tensor:
    """Features of images in [-1, 1] (float) or [0, 255] (uint8), on the CPU."""
    if images.dtype == torch.uint8:
        images = uint8_to_unit(images)
    parts = [net(images[i : i + batch].clamp(-1, 1)) for i in range(0, len(images), batch)]
    return torch.cat(parts).cpu()


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over all pairs i != j."""
    n = len(features)
    if n < 2:
        return 0.0
    d = torch.cdist(features.double(), features.double())
    return float(d.sum() / (n * (n - 1)))


def quality_metrics(real: Tensor, fake: Tensor, seed: int = 0) -> dict[str, float]:
    """KID x1000, precision, recall, coverage and diversity of `fake` against `real` features."""
    from synthbreast.eval.fidelity import kid, prdc

    result: dict[str, float] = {}
    kid_mean, _ = kid(real.numpy(), fake.numpy(), subsets=50, subset_size=500, seed=seed)
    result["kid"] = 1000 * kid_mean
    if min(len(real), len(fake)) > NEAREST_K:
        found = prdc(real.numpy(), fake.numpy(), k=NEAREST_K)
        result.update({k: found[k] for k in ("precision", "recall", "coverage")})
    real_spread = mean_pairwise_distance(real)
    result["diversity"] = mean_pairwise_distance(fake) / real_spread if real_spread else 0.0
    return result


def collapse_reasons(metrics: dict[str, Any]) -> list[str]:
    """Why a generated set counts as collapsed (empty: it does not)."""
    reasons = []
    diversity, recall = metrics.get("diversity"), metrics.get("recall")
    if diversity is not None and diversity < COLLAPSE_DIVERSITY:
        reasons.append(
            f"diversity {diversity:.2f} of the real images' (collapse below {COLLAPSE_DIVERSITY})"
        )
    if recall is not None and recall < COLLAPSE_RECALL:
        reasons.append(f"recall {recall:.2f} (collapse below {COLLAPSE_RECALL})")
    return reasons


# `generate --snapshot best`. Of the snapshots whose every class reaches twice the collapse
# recall (else of all): for a model of several classes, the newest whose synth_real_accuracy
# is within SNAPSHOT_TOLERANCE of the highest; for a model of one class (nothing to
# classify), or a run written before that figure existed, the lowest KID.
# Why, measured on the real IDC sample (README "Training", 2026-12-07; six runs, three
# patient splits, with and without the class loss): at the metric's 256 fakes per class,
# recall is noisy by about a factor of two (the lowest-KID snapshot once had class-0 recall
# 0.084 at its snapshot and 0.04 in generate's own check, and stopped the pipeline at the
# gate); KID of one checkpoint measured five times ranged 1.36-2.79, wider than the spread
# between snapshots, and its minimum chose early snapshots whose synthetic sets taught the
# classifier less (synth-real balanced accuracy 0.51 and 0.56 where the last snapshot gave
# 0.69 and 0.69). synth_real_accuracy repeats within 0.01-0.03 (sd over five measurements),
# but its highest value still chose a snapshot that failed downstream (14 of 26 kimg: 0.51
# against 0.65 at 26); an earlier snapshot wins only by more than the tolerance.
TRUSTED_RECALL = 2 * COLLAPSE_RECALL
SNAPSHOT_TOLERANCE = 0.10
SNAPSHOT_RULE = (
    f"the newest of the snapshots with recall >= {TRUSTED_RECALL:.2f} in every class whose "
    f"synth_real_accuracy is within {SNAPSHOT_TOLERANCE:.2f} of the highest (lowest kid "
    f"without classes)"
)


def worst_class_recall(line: dict[str, Any]) -> float | None:
    """The lowest per-class recall of a snapshot line (its overall one without classes)."""
    classes = line.get("classes")
    if isinstance(classes, dict) and classes:
        found = [m.get("recall") for m in classes.values() if isinstance(m, dict)]
        found = [r for r in found if isinstance(r, (int, float))]
        return min(found) if found else None
    recall = line.get("recall")
    return recall if isinstance(recall, (int, float)) else None


def best_snapshot(lines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The snapshot line `generate --snapshot best` takes (SNAPSHOT_RULE); when none has
    that recall (or none measured it: too few images), the best of all. Lines without a
    numeric kid are never chosen; synth_real_accuracy decides only where every candidate
    has it (runs written before it existed are still ranked by KID)."""
    scored = [line for line in lines if isinstance(line.get("kid"), (int, float))]
    trusted = [line for line in scored if (worst_class_recall(line) or 0.0) >= TRUSTED_RECALL]
    pool = trusted or scored
    if not pool:
        return None
    if all(isinstance(line.get("synth_real_accuracy"), (int, float)) for line in pool):
        top = max(line["synth_real_accuracy"] for line in pool)
        near = [line for line in pool if line["synth_real_accuracy"] >= top - SNAPSHOT_TOLERANCE]
        return max(near, key=lambda line: line.get("step", 0))
    return min(pool, key=lambda line: line["kid"])


REMEDY = (
    "train longer (--kimg), add discriminator augmentation (--augment diffaug or ada), or use "
    "another --budget"
)


def summarise(per_class: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One line for a jsonl: each class's figures, their mean, and the verdict."""
    keys = sorted({k for m in per_class.values() for k in m})
    mean = {k: float(np.mean([m[k] for m in per_class.values() if k in m])) for k in keys}
    collapsed = {c: r for c, m in per_class.items() if (r := collapse_reasons(m))}
    return {**mean, "classes": per_class, "collapsed": collapsed}


def fit_probe(features: list[Tensor], labels: list[int]):
    """A logistic regression on standardised features, one list entry per class. lbfgs
    draws nothing at random: the same features give the same classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = torch.cat(features).double().numpy()
    y = np.concatenate([np.full(len(f), c) for f, c in zip(features, labels, strict=True)])
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)


def synth_real_accuracy(fake: dict[int, Tensor], real: dict[int, Tensor]) -> dict[int, float]:
    """Per class, the share of its real images that a probe fitted on the fakes labels right."""
    classes = sorted(fake)
    model = fit_probe([fake[c] for c in classes], classes)
    return {c: float(np.mean(model.predict(real[c].double().numpy()) == c)) for c in classes}


class ClassProbe:
    """A logistic regression on standardised texture features of real images, per class: how
    a real-trained classifier labels generated ones (`class_accuracy`). Fitted once."""

    def __init__(self, real: dict[int, Tensor]) -> None:
        classes = sorted(real)
        # the held-out figure: fitted on even images, scored on odd ones, balanced over classes
        # (none when a class has a single image: nothing of it would be held out)
        self.real_accuracy: float | None = None
        if min(len(real[c]) for c in classes) >= 2:
            half = fit_probe([real[c][0::2] for c in classes], classes)
            held_out = [half.predict(real[c][1::2].double().numpy()) == c for c in classes]
            self.real_accuracy = float(np.mean([np.mean(found) for found in held_out]))
        self.model = fit_probe([real[c] for c in classes], classes)

    def accuracy(self, fake: Tensor, label: int) -> float:
        return float(np.mean(self.model.predict(fake.double().numpy()) == label))


def real_reference(
    net: TextureNet, shard_paths: Sequence[str | Path], labels: Sequence[int | None], seed: int = 0
) -> tuple[dict[int | None, Tensor], int | None]:
    """Texture features of at most REAL_REFERENCE real images per label (a seeded reservoir
    over the shards, one pass; label None: every image), and the images' side."""
    from synthbreast.data.shards import decode_image, image_bytes, iter_shard

    rng = random.Random(seed)
    reservoirs: dict[int | None, list[bytes]] = {label: [] for label in labels}
    seen = dict.fromkeys(labels, 0)
    for path in shard_paths:
        for sample in iter_shard(Path(path)):
            key = None if None in reservoirs else int(sample["cls"])
            if key not in reservoirs:
                continue
            seen[key] += 1
            bucket = reservoirs[key]
            if len(bucket) < REAL_REFERENCE:
                bucket.append(image_bytes(sample))
            elif (j := rng.randrange(seen[key])) < REAL_REFERENCE:
                bucket[j] = image_bytes(sample)
    real: dict[int | None, Tensor] = {}
    side: int | None = None
    for label, encoded in reservoirs.items():
        if not encoded:
            raise ValueError(f"no real images of class {label} in the shards")
        images = np.stack([np.asarray(decode_image(b)) for b in encoded])
        side = images.shape[1]
        real[label] = texture_features(net, torch.from_numpy(images).permute(0, 3, 1, 2))
    return real, side


class GeneratorQuality:
    """`quality_metrics` of a generator's images against a fixed real sample, per class.

    The real sample (at most REAL_REFERENCE per class: a seeded reservoir over the shards, one
    pass) and the latents are fixed at construction, so successive calls (the snapshots of a
    training run) compare. `labels`: the classes to draw; None in it means "every class" (an
    unconditional model of the whole pool).
    """

    def __init__(
        self,
        shard_paths: Sequence[str | Path],
        labels: Sequence[int | None],
        count: int,
        latent_dim: int,
        seed: int = 0,
    ) -> None:
        self.net = TextureNet()
        self.count = count
        self.seed = seed
        self.real, self.side = real_reference(self.net, shard_paths, labels, seed)
        generator = torch.Generator().manual_seed(seed + 7919)
        self.latents = torch.randn(count, latent_dim, generator=generator)
        self.probe = None
        if None not in self.real and len(self.real) >= 2:
            self.probe = ClassProbe(self.real)  # type: ignore[arg-type]

    @torch.no_grad()
    def __call__(self, G: nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
        per_class, fakes = {}, {}
        for label, real in self.real.items():
            images = []
            # the same noise at every snapshot (label None: one unconditional model)
            noise = torch.Generator().manual_seed(label or 0)
            for start in range(0, self.count, 128):
                z = self.latents[start : start + 128].to(device)
                labels = None
                if G.config.num_classes:
                    labels = torch.full((len(z),), label, device=device)
                x = G.sample(z, labels, noise).float().clamp(-1, 1)
                if self.side and x.shape[-1] != self.side:  # at the size generate writes
                    x = F.interpolate(x, size=(self.side, self.side), mode="bilinear",
                                      antialias=True)  # fmt: skip
                images.append(x.cpu())
            fake = fakes[label] = texture_features(self.net, torch.cat(images))
            found = quality_metrics(real, fake, seed=self.seed)
            if self.probe is not None:
                found["class_accuracy"] = self.probe.accuracy(fake, label)
            per_class["all" if label is None else str(label)] = found
        if self.probe is not None:
            shares = synth_real_accuracy(fakes, self.real)  # type: ignore[arg-type]
            for label, share in shares.items():
                per_class[str(label)]["synth_real_accuracy"] = share
        summary = summarise(per_class)
        if self.probe is not None:
            summary["real_class_accuracy"] = self.probe.real_accuracy
        return summary


# `generate --filter class-probe`: keep a generated image only where the ClassProbe, fitted on
# the GAN's own training pool (never on the patients the classifier is tested on), labels it
# the class it was drawn as (probability >= FILTER_THRESHOLD); draw until the shard is full.
# A conditional generator mixes the classes' looks (class-0 images with class 1's dense
# clumps), and a classifier trained on them learns that mix. Measured on the real IDC sample
# (README "Training", 2026-12-08; the 26 kimg checkpoints of three patient splits and of the
# demo, the same latents with and without the filter): synth-real AUC rose on all four (+0.01
# to +0.07), balanced accuracy on three (-0.02 to +0.06). Keeping only the quarter the probe
# rates most typical raised AUC more (+0.03 to +0.09) but lost balanced accuracy on two of
# four (-0.06, -0.07): too typical a set shifts the classifier's threshold on real images.
FILTER_THRESHOLD = 0.5
FILTER_DRAWS = 4  # candidates per kept image at most; a shard still short is topped up


class ClassFilter:
    """How likely each generated image is of its class, to a real-trained texture probe."""

    def __init__(self, shard_paths: Sequence[str | Path], classes: Sequence[int]) -> None:
        self.net = TextureNet()
        real, _ = real_reference(self.net, shard_paths, list(classes))
        self.probe = ClassProbe(real)  # type: ignore[arg-type]
        self.classes = [int(c) for c in self.probe.model.classes_]

    def probability(self, images: np.ndarray, label: int) -> np.ndarray:
        """(N, H, W, 3) uint8 -> P(label) per image."""
        features = texture_features(self.net, torch.from_numpy(images).permute(0, 3, 1, 2))
        column = self.classes.index(label)
        return self.probe.model.predict_proba(features.double().numpy())[:, column]
