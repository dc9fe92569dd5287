"""`synthbreast classify`: train and test a transfer-learning classifier in one scenario.

Stages: resolve the scenario (name or array index) -> skip it when its metrics.json exists ->
write config.json -> plan the data from the manifests (synthbreast.eval.scenarios) -> build the
ResNet (ImageNet weights from a file, or random) -> read the images, or their cached backbone
features -> train (Adam, cross-entropy, seeded batch order) -> predict the test set -> write
predictions.csv, model.safetensors and, last, metrics.json. On an error failed.json says why.

Two training paths with the same arithmetic:
- plain: every step runs the images through the ResNet (finetune mode, or `--no-cache`).
- cached (frozen mode, the default): a frozen backbone in eval mode is a fixed function, so
  each image's pooled features are computed once and the fc trains on them for every epoch.
  This is the same math as the plain loop (the same fc init, the same batches in the same
  order; tests/test_classify.py checks they agree to 1e-5) at the cost of one forward pass per
  image instead of one per image per epoch (bench/classify_speed.py). There is no random
  augmentation in the paper's protocol; augmentation would make features differ per epoch.
  Features are stored per shard under OUT/features/<backbone>-<weights digest>-<size>/
  <shard sha256>.safetensors, so the scenarios sharing images share their features.

Images are held in memory as uint8 at their stored size (7.5 kB per 50x50 patch: 400 MB for the
paper's 53,200 training images) and resized per batch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from synthbreast import __version__
from synthbreast.config import (
    ClassifyConfig,
    run_only_fields,
    save_config,
    to_dict,
    with_resolved_paths,
)
from synthbreast.data.shards import (
    decode_image,
    image_bytes,
    iter_shard,
    load_manifest,
    manifest_channels,
    manifest_classes,
)
from synthbreast.devices import choose_device
from synthbreast.errors import UserError
from synthbreast.eval.metrics import (
    METRICS_SCHEMA,
    classification_metrics,
    multiclass_metrics,
    predict,
    predict_classes,
    result_problem,
)
from synthbreast.eval.scenarios import (
    ALL_SCENARIOS,
    DataPlan,
    ScenarioPlan,
    ShardRef,
    keep_mask,
    plan_scenario,
    resolve_scenario,
    scenario_names,
)
from synthbreast.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    out_of_space_or_unwritable,
    read_json,
    sha256_file,
)
from synthbreast.models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODES,
    WEIGHTS,
    backbone_digest,
    backbone_features,
    backbone_spec,
    build_classifier,
    grey_input,
    imagenet_weights_path,
    input_channels,
    load_imagenet_state,
    model_input_channels,
    set_trainable,
    train_mode,
)
from synthbreast.results import CONFIG, FAILED, MANIFEST, METRICS, MODEL, PREDICTIONS

FEATURES = "features"
# Bump when the preprocessing changes, so old cached features are not reused.
PREPROCESS_VERSION = "bilinear-antialias-imagenet-norm-channels-last-2"
# Config fields that do not change a run's result: a rerun differing only in them is the same.
_RUN_ONLY_FIELDS = run_only_fields(ClassifyConfig)

Log = Callable[[str], None]


# --- options ---------------------------------------------------------------------------------


def parse_input_size(value: str | int) -> int | None:
    """'224' -> 224; 'native' -> None (the images' own size)."""
    text = str(value).strip().lower()
    if text == "native":
        return None
    try:
        size = int(text)
    except ValueError:
        raise UserError(
            f"--input-size {value!r}: give a side in pixels (224) or 'native'"
        ) from None
    if size < 32:
        raise UserError(f"--input-size {size} is too small for a ResNet (use at least 32)")
    return size


def validate(config: ClassifyConfig) -> None:
    spec = backbone_spec(config.backbone)
    if config.weights not in WEIGHTS:
        raise UserError(f"--weights {config.weights!r} unknown; choose from {', '.join(WEIGHTS)}")
    if config.weights == "imagenet" and spec.imagenet is None:
        raise UserError(f"--backbone {config.backbone} has no ImageNet weights: use --weights none")
    if config.mode not in MODES:
        raise UserError(f"--mode {config.mode!r} unknown; choose from {', '.join(MODES)}")
    parse_input_size(config.input_size)
    for name in ("epochs", "batch_size", "feature_batch_size", "n_boot"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not math.isfinite(config.lr) or config.lr <= 0:
        raise UserError(f"--lr {config.lr} must be a positive number")
    if not math.isfinite(config.synth_ratio) or config.synth_ratio < 0:
        raise UserError(f"--synth-ratio {config.synth_ratio} must be a number >= 0")
    if config.scenario == ALL_SCENARIOS:
        if config.task_id is not None:
            raise UserError("--scenario all runs every scenario: leave out --task-id")
    elif not (config.features_only and config.scenario is None and config.task_id is None):
        resolve_scenario(config.scenario, config.task_id)  # --features-only: all by default


def uses_cache(config: ClassifyConfig) -> bool:
    return config.mode == "frozen" and config.cache_features


# --- reading samples -------------------------------------------------------------------------


@dataclass
class Samples:
    """Samples in reading order; `x` holds uint8 images [N, C, H, W] (C = 3, or 1 for a model
    that reads grey) or features [N, D]."""

    keys: list[str]
    labels: torch.Tensor  # int64 [N]
    patients: list[str]  # "" for synthetic images
    x: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, keep: list[bool]) -> Samples:
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
        return Samples(
            [self.keys[i] for i in index.tolist()],
            self.labels[index],
            [self.patients[i] for i in index.tolist()],
            self.x[index],
        )

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        return Samples(
            [k for p in parts for k in p.keys],
            torch.cat([p.labels for p in parts]),
            [q for p in parts for q in p.patients],
            torch.cat([p.x for p in parts]),
        )

    def counts(self) -> dict[str, int]:
        values, counts = torch.unique(self.labels, return_counts=True)
        return {str(v): int(n) for v, n in zip(values.tolist(), counts.tolist(), strict=True)}


def read_shard(ref: ShardRef, kind: str, channels: int = 3) -> Samples:
    """Decode one shard (checked against its manifest sha256) into uint8 images of `channels`
    channels: 3 for an RGB stem (grey images replicated into it), 1 for a model reading grey."""
    if not ref.path.is_file():
        raise UserError(f"{ref.path} is missing (listed in {ref.manifest}); rerun its stage")
    if sha256_file(ref.path) != ref.sha256:
        raise UserError(
            f"{ref.path} differs from its sha256 in {ref.manifest}: the shard changed or is "
            f"damaged; check it with `synthbreast inspect {ref.path.parent}`"
        )
    keys, labels, patients, images = [], [], [], []
    for sample in iter_shard(ref.path):
        meta = json.loads(sample["json"])
        keys.append(sample["__key__"])
        labels.append(int(sample["cls"]))
        patients.append(str(meta.get("patient", "")) if kind == "real" else "")
        images.append(np.asarray(decode_image(image_bytes(sample), channels)))
    sizes = {a.shape for a in images}
    if len(sizes) > 1:
        raise UserError(f"{ref.path} holds images of several sizes {sorted(sizes)}")
    stacked = np.stack(images)
    if stacked.ndim == 3:  # grey: [N, H, W]
        stacked = stacked[..., None]
    x = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
    return Samples(keys, torch.tensor(labels, dtype=torch.long), patients, x)


def load_plan(plan: DataPlan, seed: int, load_shard: Callable[[ShardRef, str], Samples]) -> Samples:
    """Every part's shards read by `load_shard`, then the part's selection applied."""
    chosen = []
    for part in plan.parts:
        loaded = [load_shard(ref, part.kind) for ref in part.shards]
        samples = Samples.concat(loaded)
        shas = [ref.sha256 for ref, s in zip(part.shards, loaded, strict=True) for _ in s.keys]
        chosen.append(
            samples.select(keep_mask(part, shas, samples.keys, samples.labels.tolist(), seed))
        )
    return Samples.concat(chosen)


def preprocess(
    images: torch.Tensor,
    size: int | None,
    device: torch.device,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float, resized to size x size (bilinear, antialiased when
    shrinking), normalised with the backbone's mean and std (ImageNet's for torchvision's
    weights; one grey channel: the mean of the three). Resize and normalisation commute."""
    x = images.to(device, non_blocking=True).float().div_(255)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    if x.shape[1] == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    mean_t = torch.tensor(mean, device=device).view(1, len(mean), 1, 1)
    std_t = torch.tensor(std, device=device).view(1, len(std), 1, 1)
    return (x - mean_t) / std_t


# --- cached features -------------------------------------------------------------------------


class FeatureCache:
    """Backbone features per shard, on disk: computed once, shared by every scenario and rerun.

    One folder per (backbone, weights digest, input size, preprocessing), one safetensors file
    per shard named by the shard's sha256, written atomically. The weights digest hashes the
    backbone's actual tensors, so random-init backbones of different seeds do not collide.
    """

    def __init__(
        self,
        root: Path,
        model: nn.Module,
        backbone: str,
        size: int | None,
        device: torch.device,
        batch_size: int,
        progress=None,
        log: Log | None = None,
    ):
        digest = backbone_digest(model)
        size_tag = f"{size}px" if size else "native"
        self.dir = Path(root) / f"{backbone}-{digest[:16]}-{size_tag}"
        self.fingerprint = {
            "backbone": backbone,
            "backbone_sha256": digest,
            "input_size": size,
            "preprocess": PREPROCESS_VERSION,
        }
        self.model, self.size, self.device, self.batch_size = model, size, device, batch_size
        self.norm = (backbone_spec(backbone).mean, backbone_spec(backbone).std)
        self.channels = model_input_channels(model)  # 3, or 1 for cnn4 on grey data
        self.progress, self.log = progress, log
        self.task = None
        self.computed = self.reused = 0

    def plan(self, plans: list[DataPlan]) -> None:
        """Say how much is to compute, and start a progress bar for it."""
        refs = {r.sha256: r for p in plans for part in p.parts for r in part.shards}
        todo = [r for sha, r in refs.items() if not self._path(sha).is_file()]
        if self.log:
            self.log(
                f"features: {len(refs) - len(todo)} shards cached in {self.dir}, "
                f"{len(todo)} to compute"
            )
        if self.progress is not None and todo:
            total = sum(r.count for r in todo)
            self.task = self.progress.add_task("backbone features", total=total)

    def _path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.safetensors"

    def __call__(self, ref: ShardRef, kind: str) -> Samples:
        path = self._path(ref.sha256)
        if path.is_file():
            cached = self._read(path, ref, kind)
            if cached is not None:
                self.reused += 1
                return cached
        samples = read_shard(ref, kind, self.channels)
        features = self.compute(samples.x)
        self._write(path, ref, samples, features)
        self.computed += 1
        return Samples(samples.keys, samples.labels, samples.patients, features)

    @torch.no_grad()
    def compute(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of uint8 images, in batches, backbone in eval mode.
        Weights and batches in channels_last, oneDNN's own layout: without it every conv
        reorders its input and output (bench/ceilings.py `features`: 1.3x the backbone's img/s
        on 2 CPU cores); the same arithmetic, features equal up to float rounding."""
        self.model.eval().to(memory_format=torch.channels_last)
        out = []
        for start in range(0, len(images), self.batch_size):
            images_in = images[start : start + self.batch_size]
            batch = preprocess(images_in, self.size, self.device, *self.norm)
            batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(backbone_features(self.model, batch).float().cpu())
            if self.task is not None:
                self.progress.advance(self.task, len(batch))
        return torch.cat(out)

    def _write(self, path: Path, ref: ShardRef, samples: Samples, features: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "fingerprint.json").is_file():
            atomic_write_json(self.dir / "fingerprint.json", self.fingerprint)
        metadata = {
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "shard": str(ref.path),
            "shard_sha256": ref.sha256,
            "keys": json.dumps(samples.keys),
            "patients": json.dumps(samples.patients),
            "created_by": f"synthbreast {__version__}",
        }
        tensors = {"features": features.contiguous(), "labels": samples.labels.contiguous()}
        atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))

    def _read(self, path: Path, ref: ShardRef, kind: str) -> Samples | None:
        """The cached features, or None when the file is damaged or not of this fingerprint."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
                features, labels = f.get_tensor("features"), f.get_tensor("labels")
            same = json.loads(metadata["fingerprint"]) == self.fingerprint
            keys, patients = json.loads(metadata["keys"]), json.loads(metadata["patients"])
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
            if self.log:
                self.log(f"features: recomputing {path.name} ({err})")
            return None
        if not same or len(keys) != ref.count or len(features) != ref.count:
            return None
        if kind != "real":
            patients = [""] * len(keys)
        return Samples(keys, labels, patients, features)


# --- training and prediction -----------------------------------------------------------------


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run with `count` torch threads (None: leave as is), restoring the number after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(
    forward: Callable[[torch.Tensor], torch.Tensor],
    parameters: list[nn.Parameter],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    config: ClassifyConfig,
    device: torch.device,
    progress=None,
) -> list[dict[str, Any]]:
    """Adam + cross-entropy over `epochs` of seeded random batches. `prepare` turns a batch of
    `inputs` into what `forward` takes. Both training paths call this same loop."""
    order_rng = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    labels_on_device = labels.to(device)
    n = len(labels)
    task = progress.add_task("training", total=config.epochs * n) if progress is not None else None
    history = []
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(n, generator=order_rng)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            targets = labels_on_device[index.to(device)]
            logits = forward(prepare(inputs[index]))
            loss = loss_fn(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # summed on the device: no host sync per step
            loss_sum += loss.detach() * len(index)
            correct += (logits.detach().argmax(1) == targets).sum()
            if task is not None:
                progress.advance(task, len(index))
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum.item() / n,
                "train_accuracy": correct.item() / n,
            }
        )
    return history


@torch.no_grad()
def predict_prob(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
) -> np.ndarray:
    """P(each class) for every input, in order: [N, K] (two classes: P(class 1) is [:, 1])."""
    probs = []
    for start in range(0, len(inputs), batch_size):
        logits = forward(prepare(inputs[start : start + batch_size]))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(probs).double().numpy()


# --- the run folder --------------------------------------------------------------------------


def run_dir_of(config: ClassifyConfig, name: str) -> Path:
    return Path(config.out) / name


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RUN_ONLY_FIELDS}


def inputs_changed(run_dir: Path, plan: ScenarioPlan) -> list[str]:
    """The data manifests a finished run read that are no longer those the plan reads (a
    regenerated synthetic set, a re-ingest): its metrics describe other data."""
    try:
        data = read_json(run_dir / METRICS)["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["metrics.json unreadable"]
    changed = []
    for part, now in (("train", plan.train), ("test", plan.test)):
        before = {m["path"]: m["sha256"] for m in data.get(part, {}).get("manifests", [])}
        current = {m["path"]: m["sha256"] for m in now.manifests()}
        changed += [
            f"{part}: {path}" for path in sorted(current) if before.get(path) != current[path]
        ]
        changed += [
            f"{part}: {path} (no longer read)" for path in sorted(set(before) - set(current))
        ]
    return changed


def unreadable_result(run_dir: Path) -> str | None:
    """Why run_dir/metrics.json is not a whole result (cut short by a full disk, a torn copy,
    edited by hand), or None when it is one or there is none."""
    path = run_dir / METRICS
    if not path.is_file():
        return None
    try:
        metrics = read_json(path)
    except (OSError, ValueError) as err:  # a bad UTF-8 byte is a ValueError too
        return f"not JSON: {err}"
    return result_problem(metrics)


def is_complete(run_dir: Path, config: ClassifyConfig, plan: ScenarioPlan | None = None) -> bool:
    """metrics.json exists, is a whole result, and was made by this same job from the same data
    (the manifests' sha256); a different job there is an error; unreadable or changed, a redo."""
    if not (run_dir / METRICS).is_file() or unreadable_result(run_dir):
        return False
    try:
        before = read_json(run_dir / CONFIG)
    except (OSError, ValueError):
        return False
    if plan is not None and inputs_changed(run_dir, plan):
        return False
    if comparable(before) != comparable(to_dict(config)):
        differ = sorted(
            k
            for k in comparable(to_dict(config))
            if comparable(before).get(k) != comparable(to_dict(config)).get(k)
        )
        raise UserError(
            f"{run_dir} holds a finished run of another config (differs in {', '.join(differ)}): "
            "pass --force to redo it, or use another --out"
        )
    return True


def of_the_papers_layout(config: ClassifyConfig) -> bool:
    """The paper's accuracies are of IDC histology patches: only real shards of that layout
    are compared with them (a mammography ingest is not)."""
    if not config.real:
        return True  # synthetic only (synth-synth): the GAN's own data decides, as before
    source = read_json(Path(config.real) / MANIFEST).get("source", {})
    return source.get("format", "idc") == "idc"


def write_predictions(path: Path, samples: Samples, probs: np.ndarray) -> None:
    """One row per test image; two classes: its P(class 1) (`prob_1`), more: P of each class
    (`prob_0` .. `prob_<K-1>`), and the predicted class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    binary = probs.shape[1] == 2
    columns = ["prob_1"] if binary else [f"prob_{c}" for c in range(probs.shape[1])]
    writer.writerow(["key", "patient", "label", *columns, "pred"])
    pred = predict(probs[:, 1]) if binary else predict_classes(probs)
    for i, key in enumerate(samples.keys):
        label = int(samples.labels[i])
        values = [probs[i, 1]] if binary else list(probs[i])
        writer.writerow(
            [key, samples.patients[i], label, *(f"{v:.6f}" for v in values), int(pred[i])]
        )
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_model(path: Path, model: nn.Module, config: ClassifyConfig) -> None:
    """The whole state dict: models.classifier.classifier_for_state(backbone, state) loads it
    (for the ResNets that is torchvision.models.<backbone>(num_classes=K))."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "backbone": config.backbone,
        "num_classes": str(model.fc.out_features),
        "config": json.dumps(to_dict(config)),
    }
    atomic_write_bytes(path, save_safetensors(state, metadata=metadata))


def data_record(plan: DataPlan, samples: Samples) -> dict[str, Any]:
    record = {"images": len(samples), "counts": samples.counts(), "manifests": plan.manifests()}
    if plan.patient_level:
        record["patients"] = len(set(samples.patients))
    return record


# --- the job ---------------------------------------------------------------------------------


def run_classify(config: ClassifyConfig, progress=None, log: Log | None = None) -> Path:
    """Run one scenario into OUT/<scenario>/; returns that folder (skipped when complete).
    A full disk or an unwritable OUT is a one-line UserError saying how to go on."""
    then = "rerun the same classify command (finished scenarios and cached features are kept)"
    with out_of_space_or_unwritable(config.out, then):
        return _run_classify(config, progress, log)


def _run_classify(config: ClassifyConfig, progress=None, log: Log | None = None) -> Path:
    validate(config)
    config = with_resolved_paths(config, "real", "synthetic")  # compared with a finished run
    scenario, task_id = resolve_scenario(config.scenario, config.task_id)
    # name and index both recorded, so --task-id 0 and --scenario real-real are the same job
    config = dataclasses.replace(config, scenario=scenario.name, task_id=task_id)
    run_dir = run_dir_of(config, scenario.name)
    # the temp files of a killed run of this scenario (one process writes a scenario folder)
    from synthbreast.train.checkpoint import remove_stale_temp_files

    remove_stale_temp_files([run_dir])
    try:
        plan = plan_scenario(scenario, task_id, config.real, config.synthetic, config.synth_ratio)
    except UserError as err:
        write_failed(run_dir, scenario.name, task_id, err)
        raise
    if not config.force and is_complete(run_dir, config, plan):
        if log:
            log(f"{scenario.name}: complete, skipped ({run_dir / METRICS}; --force redoes it)")
        return run_dir
    if log and (run_dir / METRICS).is_file() and not config.force:
        if problem := unreadable_result(run_dir):
            path = run_dir / METRICS
            log(f"{scenario.name}: {path} is unreadable ({problem}): not complete, redone")
        else:
            changed = inputs_changed(run_dir, plan)
            log(
                f"{scenario.name}: its data changed since it ran ({'; '.join(changed[:3])}): redone"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG)
    try:
        _run(config, plan, run_dir, progress, log)
    except Exception as err:
        write_failed(run_dir, scenario.name, task_id, err)
        raise
    (run_dir / FAILED).unlink(missing_ok=True)
    return run_dir


def write_failed(run_dir: Path, scenario: str, task_id: int, err: Exception) -> None:
    """failed.json: why this scenario stopped (status and the report read it). Best effort: on
    a full disk or a read-only OUT the note cannot be written, and the error itself is raised."""
    note = {
        "scenario": scenario,
        "task_id": task_id,
        "error": f"{type(err).__name__}: {err}",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / FAILED, note)
    except OSError:
        pass


def _run(
    config: ClassifyConfig, plan: ScenarioPlan, run_dir: Path, progress, log: Log | None
) -> None:
    started = time.perf_counter()
    scenario, task_id = resolve_scenario(config.scenario, config.task_id)
    (run_dir / METRICS).unlink(missing_ok=True)  # a forced rerun: no stale result meanwhile
    size = parse_input_size(config.input_size)
    device = choose_device(config.device)

    # Data: which shards and samples (planned from the manifests by run_classify).
    image_size = check_sizes(plan)

    model, imagenet, class_names, data_channels, channels = build_model(config, plan, device)
    parameters = set_trainable(model, config.mode)

    # Inputs: cached backbone features (frozen), or uint8 images run through the whole model.
    cached = uses_cache(config)
    if cached:
        cache = feature_cache(config, model, size, device, progress, log)
        cache.plan([plan.train, plan.test])
        train, test = (load_plan(p, config.seed, cache) for p in (plan.train, plan.test))
        forward = model.fc
        train.x, test.x = train.x.to(device), test.x.to(device)

        def prepare(x: torch.Tensor) -> torch.Tensor:
            return x

    else:

        def read(ref: ShardRef, kind: str) -> Samples:
            return read_shard(ref, kind, channels)

        train, test = (load_plan(p, config.seed, read) for p in (plan.train, plan.test))
        forward = model

        norm = (backbone_spec(config.backbone).mean, backbone_spec(config.backbone).std)

        def prepare(x: torch.Tensor) -> torch.Tensor:
            return preprocess(x, size, device, *norm)

    check_classes(train, test, class_names)

    # Training. The fc alone on the CPU: one thread, since a 512x2 step is too small to share
    # (measured 3x faster on the 2-core dev box when other jobs compete for the cores).
    train_mode(model, config.mode)
    with threads(1 if cached and device.type == "cpu" else None):
        history = fit(forward, parameters, train.x, train.labels, prepare, config, device, progress)

    # Test.
    model.eval()
    probs = predict_prob(forward, test.x, prepare, config.feature_batch_size)
    groups = test.patients if plan.test.patient_level else None
    if len(class_names) == 2:  # the binary figures, exactly as before (precision of class 1)
        measured = classification_metrics(
            test.labels.numpy(), probs[:, 1], groups, n_boot=config.n_boot, seed=config.seed
        )
    else:
        measured = multiclass_metrics(
            test.labels.numpy(), probs, groups, n_boot=config.n_boot, seed=config.seed,
            class_names=class_names,
        )  # fmt: skip

    # Outputs; metrics.json last: its presence means the run is complete.
    write_predictions(run_dir / PREDICTIONS, test, probs)
    write_model(run_dir / MODEL, model, config)
    metrics = {
        "schema": METRICS_SCHEMA,
        "scenario": scenario.name,
        "task_id": task_id,
        "paper_accuracy": scenario.paper_accuracy if of_the_papers_layout(config) else None,
        "train_source": f"{plan.train.description}: {len(train)} images",
        "test_source": f"{plan.test.description}: {len(test)} images",
        "data": {"train": data_record(plan.train, train), "test": data_record(plan.test, test)},
        "model": {
            "backbone": config.backbone,
            "weights": config.weights,
            "weights_file": (
                str(imagenet_weights_path(config.backbone, config.weights_path))
                if imagenet is not None
                else None
            ),
            "mode": config.mode,
            "input_size": size if size is not None else "native",
            "image_size": image_size,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "cached_features": cached,
            "num_classes": len(class_names),
            "data_channels": data_channels,
            "input_channels": channels,
            # grey data and an RGB stem: how the channel was made three (None: not needed)
            "grey_input": grey_input(config.backbone, data_channels),
        },
        **measured,
        "history": history,
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
        "created_by": f"synthbreast {__version__}",
    }
    if cached:
        metrics["model"]["feature_cache"] = str(cache.dir)
        metrics["model"]["feature_shards"] = {"computed": cache.computed, "reused": cache.reused}
    atomic_write_json(run_dir / METRICS, metrics)


def build_model(
    config: ClassifyConfig, plan: ScenarioPlan, device: torch.device
) -> tuple[nn.Module, dict[str, torch.Tensor] | None, list[str], int, int]:
    """(model, ImageNet state or None, class names, data channels, input channels). The seed
    decides the random backbone (weights none) and the new fc, so every process that builds
    the model of one config builds the same one (and finds the same feature cache)."""
    imagenet = None
    if config.weights == "imagenet":
        imagenet = load_imagenet_state(config.backbone, config.weights_path)
    # Classes and channels from the real manifest: 2 classes for IDC, 3 for healthy / benign /
    # malignant; grey data enters an RGB stem replicated, cnn4 reads it as one channel.
    class_names, data_channels = task_classes(config, plan)
    channels = input_channels(config.backbone, data_channels)
    torch.manual_seed(config.seed)
    model = build_classifier(config.backbone, imagenet, len(class_names), channels).to(device)
    return model, imagenet, class_names, data_channels, channels


def feature_cache_root(config: ClassifyConfig) -> Path:
    """The folder of the job's feature caches: --feature-cache, else OUT/features."""
    return Path(config.feature_cache or Path(config.out) / FEATURES)


def feature_cache(
    config: ClassifyConfig, model: nn.Module, size: int | None, device: torch.device,
    progress=None, log: Log | None = None,
) -> FeatureCache:  # fmt: skip
    return FeatureCache(
        feature_cache_root(config),
        model,
        config.backbone,
        size,
        device,
        config.feature_batch_size,
        progress,
        log,
    )


def task_classes(config: ClassifyConfig, plan: ScenarioPlan) -> tuple[list[str], int]:
    """(class names, channels) of the task: the real folder's manifest, or without one
    (synth-synth) the first training manifest's."""
    if config.real:
        manifest = load_manifest(Path(config.real))
    else:
        manifest = read_json(Path(plan.train.manifests()[0]["path"]))
    return manifest_classes(manifest), manifest_channels(manifest)


def check_sizes(plan: ScenarioPlan) -> int | None:
    """One stored image size for the whole scenario: a classifier must not be able to tell real
    from synthetic by size (or by how much it was resized). Returns that size."""
    sizes = plan.image_sizes()
    if len(sizes) > 1:
        listed = "; ".join(f"{s} px: {', '.join(m)}" for s, m in sizes.items())
        raise UserError(
            f"the images of scenario {plan.scenario.name} differ in size ({listed}); generate "
            "at the real patch size (`synthbreast generate --output-size 50`)"
        )
    return next(iter(sizes), None)


def check_classes(train: Samples, test: Samples, class_names: list[str] | None = None) -> None:
    """The training data holds every class of the real manifest (2 unless told)."""
    wanted = set(range(len(class_names) if class_names else 2))
    classes = set(train.labels.tolist())
    if classes != wanted:
        missing = sorted(wanted - classes)
        raise UserError(
            f"the training data has only class {sorted(classes)} ({len(train)} images), not "
            f"{missing}: a classifier needs every class; give the synthetic folders of every "
            "class (--synthetic OUT/synthetic takes every class folder inside)"
        )
    if len(test) == 0:
        raise UserError("the test data is empty: is the real test pool or the synthetic set empty?")


def run_scenarios(config: ClassifyConfig, progress=None, log: Log | None = None) -> list[Path]:
    """`--scenario all`: every scenario in registry order; otherwise the one chosen.

    A scenario that cannot run (UserError, e.g. no synthetic data) does not stop the others;
    the errors are raised together at the end.
    """
    if config.features_only:
        precompute_features(config, progress, log)
        return []
    if config.scenario != ALL_SCENARIOS:
        return [run_classify(config, progress, log)]
    if config.task_id is not None:
        raise UserError("--scenario all runs every scenario: leave out --task-id")
    done, failed = [], []
    for name in scenario_names():
        try:
            done.append(run_classify(dataclasses.replace(config, scenario=name), progress, log))
        except UserError as err:
            failed.append(f"{name}: {err}")
            if log:
                log(f"{name}: failed: {err}")
    if failed:
        raise UserError("scenarios failed (their failed.json says why):\n" + "\n".join(failed))
    return done


# --- the feature pass over processes and array tasks ------------------------------------------


def precompute_features(
    config: ClassifyConfig,
    progress=None,
    log: Log | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`classify --features-only`: this process's share of the cached backbone features of the
    chosen scenarios (all of them by default), then stop; a later `classify` finds them.

    The shards to embed (each once, in plan order) are split as `generate` splits its shards:
    a Slurm array task takes its contiguous block, then torchrun's ranks take every
    WORLD_SIZE-th of it. Processes never talk to each other: each writes its own shards' cache
    files (atomically, named by the shard's sha256), so any number of them, on any machines
    sharing the folder, fill one cache. Returns what this process did.
    """
    from synthbreast.generate import process_label, process_rank, slurm_block

    started = time.perf_counter()
    env = os.environ if env is None else env
    validate(config)
    if not uses_cache(config):
        raise UserError(
            "--features-only fills the feature cache of a frozen backbone: drop --no-cache "
            "and --mode finetune"
        )
    config = with_resolved_paths(config, "real", "synthetic")
    names = scenario_names() if config.scenario in (None, ALL_SCENARIOS) else [config.scenario]
    if config.task_id is not None:
        names = [resolve_scenario(None, config.task_id)[0].name]
    size = parse_input_size(config.input_size)
    device = choose_device(config.device)
    caches: dict[tuple[tuple[str, ...], int], FeatureCache] = {}
    todo: dict[tuple[str, str], tuple[FeatureCache, ShardRef, str]] = {}
    skipped = []
    for name in names:
        scenario, task_id = resolve_scenario(name, None)
        try:
            plan = plan_scenario(
                scenario, task_id, config.real, config.synthetic, config.synth_ratio
            )
        except UserError as err:  # e.g. no synthetic set: the other scenarios' shards still
            skipped.append(f"{name}: {err}")
            continue
        class_names, channels = task_classes(config, plan)
        key = (tuple(class_names), channels)  # one model (and cache folder) per task
        if key not in caches:
            model = build_model(config, plan, device)[0]
            caches[key] = feature_cache(config, model, size, device, progress, log)
        cache = caches[key]
        for part in plan.train.parts + plan.test.parts:
            for ref in part.shards:
                todo.setdefault((str(cache.dir), ref.sha256), (cache, ref, part.kind))
    if not todo:
        raise UserError("no scenario could be planned:\n" + "\n".join(skipped))
    items = list(todo.values())
    block = slurm_block(len(items), env)  # an empty block (more tasks than shards): none
    if block is None:
        block = range(len(items))
    rank, world = process_rank(env)
    mine = [items[i] for i in list(block)[rank::world]]
    images, computing = 0, time.perf_counter()
    task = None
    if progress is not None and mine:
        task = progress.add_task("backbone features", total=sum(r.count for _, r, _ in mine))
    for cache, ref, kind in mine:
        cache(ref, kind)
        images += ref.count
        if task is not None:
            progress.advance(task, ref.count)
    summary = {
        "rank": rank,
        "world": world,
        "shards": len(mine),
        "of_shards": len(items),
        "images": images,
        "computed": sum(c.computed for c in caches.values()),
        "reused": sum(c.reused for c in caches.values()),
        "seconds": round(time.perf_counter() - started, 3),
        "compute_seconds": round(time.perf_counter() - computing, 3),  # after the model's build
        "cache": sorted({str(c.dir) for c in caches.values()}),
        "not_planned": skipped,
    }
    if log:
        log(
            f"features ({process_label(env)}): {len(mine)} of {len(items)} shards, "
            f"{images} images: "
            f"{summary['computed']} computed, {summary['reused']} already cached, "
            f"{summary['seconds']:.1f} s -> {', '.join(summary['cache'])}"
        )
        for line in skipped:
            log(f"features: scenario not planned, its shards left out: {line}")
    return summary


def summary_line(run_dir: Path) -> str:
    """'real-real  accuracy 0.843 [0.812, 0.871]  AUC 0.912 [...]  (paper 0.84)'."""
    metrics = read_json(Path(run_dir) / METRICS)
    low, high = metrics["ci95"]["accuracy"]
    text = f"{metrics['scenario']:<16} accuracy {metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}]"
    if metrics["roc_auc"] is not None:
        text += f"  AUC {metrics['roc_auc']:.3f}"
        if metrics["ci95"]["roc_auc"]:
            low, high = metrics["ci95"]["roc_auc"]
            text += f" [{low:.3f}, {high:.3f}]"
    else:
        text += "  AUC n/a (one class in test)"
    if metrics.get("paper_accuracy") is not None:
        text += f"  (paper {metrics['paper_accuracy']:.2f})"
    return text + f"  -> {run_dir}"
