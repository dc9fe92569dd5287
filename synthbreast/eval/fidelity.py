"""Fidelity and diversity of synthetic images, computed in stages as torch-fidelity does:
features (synthbreast.eval.features) -> statistics -> metric.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the two feature sets.
  The trace of the matrix square root needs no scipy: tr(sqrt(S1 S2)) equals the sum of the
  square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), a symmetric PSD matrix, so two
  `eigh` in float64 give it, stably, even where S1 S2 is singular (fewer images than dimensions).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets; subsets are drawn exactly as
  torch-fidelity draws them (numpy RandomState(seed), `choice` without replacement), so the
  same seed gives its numbers.
- precision, recall, density, coverage (Naeem et al. 2020) from k-nearest-neighbour balls.
- SiFID (Shaham et al. 2019), per SinGAN model of the generate-singan folders among the
  synthetic ones, beside its real-vs-real floor: synthbreast.eval.sifid, fidelity.json's
  "sifid" (the same `frechet_distance`, of one image's feature map positions).

Distances are computed in blocks as |x|^2 - 2 x.y + |y|^2 with matrix products
(synthbreast.eval.memorisation), so 40,000 x 40,000 items never hold a full distance matrix.
Everything in the first part is a pure function of arrays; the job `run_fidelity` (reading
shards, writing fidelity.json) is at the end.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from synthbreast import __version__
from synthbreast.config import (
    FidelityConfig,
    identity,
    identity_differences,
    save_config,
    to_dict,
    with_resolved_paths,
)
from synthbreast.data.shards import load_manifest
from synthbreast.devices import choose_device
from synthbreast.errors import UserError
from synthbreast.eval import plots
from synthbreast.eval.features import (
    EXTRACTORS,
    MISSING_WEIGHTS,
    Extractor,
    ExtractorOptions,
    Features,
    Source,
    build_extractor,
    cached_features,
    channels_extractor,
    concatenate,
    features_share,
    load_images,
    real_source,
    synthetic_sources,
)
from synthbreast.eval.histology import histology_run
from synthbreast.eval.memorisation import (
    COLUMN_BLOCK,
    ROW_BLOCK,
    Memorisation,
    as_tensor,
    distance_blocks,
    kth_neighbour_distances,
    memorisation,
)
from synthbreast.eval.scenarios import check_provenance
from synthbreast.fileio import atomic_write_json, read_json
from synthbreast.images import make_grid, save_png
from synthbreast.results import CONFIG, FIDELITY, FIDELITY_SCHEMA

# Result keys (fidelity.json's "overall" and "per_class" entries).
FID = "fid"
KID_MEAN = "kid_mean"
KID_STD = "kid_std"
PRECISION = "precision"
RECALL = "recall"
DENSITY = "density"
COVERAGE = "coverage"
METRIC_KEYS = (FID, KID_MEAN, KID_STD, PRECISION, RECALL, DENSITY, COVERAGE)

NEAREST_K = 5  # Naeem et al.'s k
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def one_blas_thread():
    """numpy's eigensolvers on one thread: on a busy machine OpenBLAS threads spin-wait for each
    other (a 2048 x 2048 eigh took 27 s with its default threads on the loaded 2-core dev box,
    6 s on one)."""
    return threadpool_limits(limits=1, user_api="blas")


# --- FID ---------------------------------------------------------------------------------------


def feature_statistics(
    features: Any, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as numpy's np.cov) of N x D features, in float64."""
    x = torch.as_tensor(features).to(device, torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors (N x D), got shape {tuple(x.shape)}")
    mu = x.mean(0)
    centred = x - mu
    sigma = centred.T @ centred / (len(x) - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    with one_blas_thread():
        values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 @ sigma2)) = sum of sqrt(eigenvalues of sqrt(s1) s2 sqrt(s1))."""
    root1 = sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    with one_blas_thread():
        middle = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
        values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))."""
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    trace = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + trace)


def fid(real: Any, synthetic: Any, device: str | torch.device = "cpu") -> float:
    return frechet_distance(
        *feature_statistics(real, device), *feature_statistics(synthetic, device)
    )


# --- KID ---------------------------------------------------------------------------------------


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, the kernel of KID; the products in the features' precision,
    the kernel in float64 (MMD is a small difference of large sums)."""
    return ((x @ y.T).double() / x.shape[1] + 1) ** 3


def mmd2_unbiased(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> float:
    """MMD^2 with the diagonals of K_XX and K_YY left out (torch-fidelity's 'unbiased')."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return float(within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


KERNEL_ONCE = 4096  # up to this many images per set, kernels are computed once, then indexed


def kid(
    real: Any,
    synthetic: Any,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(mean, std) of MMD^2 over `subsets` random subsets of min(subset_size, n) of each set."""
    x, y = as_tensor(real, device), as_tensor(synthetic, device)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(x)} and {len(y)}")
    whole = None
    if len(x) <= KERNEL_ONCE and len(y) <= KERNEL_ONCE:
        whole = polynomial_kernel(x, x), polynomial_kernel(x, y), polynomial_kernel(y, y)
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        a = torch.from_numpy(rng.choice(len(x), size, replace=False)).to(x.device)
        b = torch.from_numpy(rng.choice(len(y), size, replace=False)).to(y.device)
        if whole is not None:
            k_xx, k_xy, k_yy = whole[0][a][:, a], whole[1][a][:, b], whole[2][b][:, b]
        else:
            xs, ys = x[a], y[b]
            k_xx = polynomial_kernel(xs, xs)
            k_xy = polynomial_kernel(xs, ys)
            k_yy = polynomial_kernel(ys, ys)
        mmds[i] = mmd2_unbiased(k_xx, k_xy, k_yy)
    return float(mmds.mean()), float(mmds.std())


# --- precision, recall, density, coverage ------------------------------------------------------


def prdc(
    real: Any,
    synthetic: Any,
    k: int = NEAREST_K,
    device: str | torch.device = "cpu",
    row_block: int = ROW_BLOCK,
    column_block: int = COLUMN_BLOCK,
) -> dict[str, float]:
    """Naeem et al. (2020), as the `prdc` package's compute_prdc, with blocked distances.

    precision: share of synthetic items inside some real item's k-NN ball (fidelity);
    recall: share of real items inside some synthetic item's k-NN ball (diversity);
    density: mean number of real balls holding a synthetic item, over k;
    coverage: share of real items whose ball holds at least one synthetic item.
    """
    x, y = as_tensor(real, device), as_tensor(synthetic, device)
    if len(x) <= k or len(y) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} images per set")
    blocks = {"device": device, "row_block": row_block, "column_block": column_block}
    real_radii = kth_neighbour_distances(x, k, **blocks)
    synthetic_radii = kth_neighbour_distances(y, k, **blocks)
    in_real_ball = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    real_balls_count = torch.zeros(len(y), dtype=torch.long, device=x.device)
    in_synthetic_ball = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    nearest_synthetic = torch.full((len(x),), math.inf, dtype=x.dtype, device=x.device)
    for r0, c0, d in distance_blocks(x, y, row_block, column_block):
        rows, columns = slice(r0, r0 + d.shape[0]), slice(c0, c0 + d.shape[1])
        below_real = d < real_radii[rows, None]
        in_real_ball[columns] |= below_real.any(0)
        real_balls_count[columns] += below_real.sum(0)
        in_synthetic_ball[rows] |= (d < synthetic_radii[None, columns]).any(1)
        nearest_synthetic[rows] = torch.minimum(nearest_synthetic[rows], d.min(1).values)
    return {
        PRECISION: float(in_real_ball.double().mean()),
        RECALL: float(in_synthetic_ball.double().mean()),
        DENSITY: float(real_balls_count.double().sum() / (k * len(y))),
        COVERAGE: float((nearest_synthetic < real_radii).double().mean()),
    }


# --- all metrics of two feature sets -----------------------------------------------------------


def fidelity_metrics(
    real: Any,
    synthetic: Any,
    k: int = NEAREST_K,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Every metric of METRIC_KEYS; a metric the set sizes cannot support is None, with a note."""
    n_real, n_synthetic = len(real), len(synthetic)
    result: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    result.update(real_images=n_real, synthetic_images=n_synthetic)
    notes = []
    if min(n_real, n_synthetic) >= 2:
        result[FID] = fid(real, synthetic, device)
        result[KID_MEAN], result[KID_STD] = kid(
            real, synthetic, kid_subsets, kid_subset_size, seed, device
        )
    else:
        notes.append("FID and KID need at least 2 images on each side")
    if min(n_real, n_synthetic) > k:
        result.update(prdc(real, synthetic, k, device))
    else:
        notes.append(f"precision/recall/density/coverage need more than k={k} images per side")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def pca_project(features: Any, dims: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, components [dims, D], explained variance ratio) of a PCA fitted to `features`."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    with one_blas_thread():
        _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = singular**2
    ratio = variance[:dims] / max(variance.sum(), 1e-300)
    return mean, vt[:dims], ratio


# --- the job: synthbreast fidelity ---------------------------------------------------------------

FEATURES_DIR = "features"
HISTOGRAMS_PNG = "histograms.png"
PLOT_POINTS = 2000  # at most this many points per group in a scatter
PCA_FIT_POINTS = 10_000  # the PCA is fitted to at most this many of each set
TSNE_POINTS = 2000  # t-SNE of at most this many points in all
PREFERRED = ("inception", "inception-torchvision", "classifier", "pixels")  # top-level pca_png


def validate(config: FidelityConfig) -> None:
    checks = (
        (config.nearest_k >= 1, "--nearest-k must be at least 1"),
        (config.kid_subsets >= 1, "--kid-subsets must be at least 1"),
        (config.kid_subset_size >= 2, "--kid-subset-size must be at least 2"),
        (config.copy_threshold > 0, "--copy-threshold must be above 0 (a distance ratio)"),
        (config.pixels_side >= 1, "--pixels-side must be at least 1"),
        (config.batch_size >= 1, "--batch-size must be at least 1"),
        (config.workers >= 0, "--workers must be at least 0 (0: read in the main process)"),
        (config.closest_pairs >= 1, "--closest-pairs must be at least 1"),
        (config.sifid_floor_images >= 1, "--sifid-floor-images must be at least 1"),
        (config.sifid_variants >= 1, "--sifid-variants must be at least 1"),
    )
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if config.sifid_space is not None:
        from synthbreast.eval.sifid import SPACES as SIFID_SPACES

        if config.sifid_space not in SIFID_SPACES:
            raise UserError(
                f"--sifid-space {config.sifid_space!r} unknown; choose from "
                f"{', '.join(SIFID_SPACES)}"
            )
    if config.floor_pool == config.real_pool:
        raise UserError(
            f"--floor-pool {config.floor_pool} is --real-pool too: the real-vs-real floor needs "
            "two disjoint patient sets (e.g. --real-pool test --floor-pool train)"
        )


def resolve_extractors(config: FidelityConfig) -> tuple[list[str], dict[str, str]]:
    """The extractors to run, and those left out with the reason. Named ones must all work;
    the default is pixels, texture and histology (trained on the real train pool when there is
    one), plus classifier when a run is given, plus inception when its weights are present."""
    if config.extractors:
        names = list(dict.fromkeys(config.extractors))
        for name in names:
            if name not in EXTRACTORS:
                raise UserError(
                    f"--extractor {name!r} unknown; choose from {', '.join(EXTRACTORS)}"
                )
        weighted = [name for name in names if name in MISSING_WEIGHTS]
        if len(weighted) > 1 and config.weights_path:
            raise UserError(
                f"--weights-path is one file, for one of {' and '.join(weighted)}: run them "
                "without it (each from its default place) or in separate --out folders"
            )
        for name in weighted:
            reason = MISSING_WEIGHTS[name](config.weights_path)
            if reason is not None:
                raise UserError(reason)
        return names, {}
    names, skipped = ["pixels", "texture", "histology"], {}
    if config.classifier_run:
        names.append("classifier")
    reason = MISSING_WEIGHTS["inception"](config.weights_path)  # the standard FID network
    if reason is None:
        names.append("inception")
    else:
        skipped["inception"] = reason
    return names, skipped


def _manifests(data: dict[str, Any]) -> dict[str, list[str]]:
    return {
        part: [m["sha256"] for m in entry["manifests"]] if entry else []
        for part, entry in data.items()
    }


def _reuse(result_path: Path, config: FidelityConfig, data: dict[str, Any]) -> bool:
    """True when a finished fidelity.json of the same settings and the same manifests is
    there (skip the job); a UserError when it is of other settings or data."""
    if not result_path.is_file() or config.force:
        return False
    try:
        earlier = read_json(result_path)
        earlier_config, earlier_data = earlier.get("config", {}), _manifests(earlier["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # damaged: redo
    if earlier.get("schema") != FIDELITY_SCHEMA:
        return False  # written by an older synthbreast, without what this one adds: redo
    differ = identity_differences(earlier_config, identity(config), lambda k: f"{k}:")
    differ += [
        f"the {part} shards' manifests changed"
        for part, shas in _manifests(data).items()
        if earlier_data.get(part) != shas
    ]
    if differ:
        raise UserError(
            f"{result_path} was computed with other settings or data ({'; '.join(differ[:4])}); "
            "pass --force to recompute it, or choose another --out"
        )
    return True


def _singan(source: Source) -> bool:
    from synthbreast.eval.sifid import is_singan

    return is_singan(load_manifest(source.root))


def _data_entry(sources: Sequence[Source]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for source in sources:
        for label, n in source.counts.items():
            counts[label] = counts.get(label, 0) + n
    return {
        "description": "; ".join(s.description for s in sources),
        "images": sum(s.images for s in sources),
        "counts": dict(sorted(counts.items())),
        "manifests": [
            {"path": str(s.root / "manifest.json"), "sha256": s.manifest_sha256, "pool": s.pool}
            for s in sources
        ],
    }


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, limit, replace=False)) if n > limit else np.arange(n)


def _groups(real: Features, synthetic: Features, rng: np.random.Generator) -> dict:
    """Rows per plotted group ('real 0', 'synthetic 1', ...), each at most PLOT_POINTS."""
    groups = {}
    for name, part in (("real", real), ("synthetic", synthetic)):
        for label in np.unique(part.labels).tolist():
            rows = np.flatnonzero(part.labels == label)
            rows = rows[_subsample(len(rows), PLOT_POINTS, rng)]
            groups[f"{name} class {label}"] = (part, rows)
    return groups


def pca_scatter(real: Features, synthetic: Features, title: str, seed: int):
    rng = np.random.default_rng(seed)
    fit = np.concatenate(
        [
            real.features[_subsample(len(real), PCA_FIT_POINTS, rng)],
            synthetic.features[_subsample(len(synthetic), PCA_FIT_POINTS, rng)],
        ]
    )
    mean, components, ratio = pca_project(fit)
    groups = {
        name: (part.features[rows] - mean) @ components.T
        for name, (part, rows) in _groups(real, synthetic, rng).items()
    }
    share = " + ".join(f"{r:.0%}" for r in ratio)
    return plots.scatter(
        groups, f"{title}: PCA ({share} of the variance)", "PC 1", "PC 2"
    ), ratio.tolist()


def tsne_scatter(real: Features, synthetic: Features, title: str, seed: int):
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    picks = [
        (name, part, rows[: TSNE_POINTS // 4])
        for name, (part, rows) in _groups(real, synthetic, rng).items()
    ]
    stacked = np.concatenate([part.features[rows] for _, part, rows in picks])
    perplexity = min(30.0, (len(stacked) - 1) / 3)
    embedded = TSNE(2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(stacked)
    groups, start = {}, 0
    for name, _, rows in picks:
        groups[name] = embedded[start : start + len(rows)]
        start += len(rows)
    return plots.scatter(groups, f"{title}: t-SNE", "t-SNE 1", "t-SNE 2")


def closest_pairs_grid(
    result: Memorisation, synthetic: Features, train: Features, heldout: Features, count: int
) -> tuple[Any, list[dict[str, Any]]]:
    """Rows of synthetic | nearest training | nearest held-out image, smallest ratio first."""
    picked = result.closest(count)

    def ref(features: Features, i: int) -> tuple[Source, str]:
        return features.sources[features.source_index[i]], features.keys[i]

    wanted = []
    listing = []
    for i in picked:
        j, h = int(result.train.index[i]), int(result.heldout.index[i])
        wanted += [ref(synthetic, i), ref(train, j), ref(heldout, h)]
        listing.append(
            {
                "synthetic": synthetic.keys[i],
                "train": train.keys[j],
                "heldout": heldout.keys[h],
                "ratio": _finite(result.train.ratio[i]),
                "distance": float(result.train.distance[i]),
                "heldout_ratio": _finite(result.heldout.ratio[i]),
            }
        )
    grid = make_grid(
        load_images(wanted), columns=3, scale=2, title="synthetic | nearest train | held-out"
    )
    return grid, listing


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def channel_summary(features: Features) -> dict[str, list[float]]:
    means = features.features.mean(0)
    return {"mean": means[:3].round(5).tolist(), "std": means[3:].round(5).tolist()}


def histograms_chart(real: Features, synthetic: Features) -> Any:
    names = ("R mean", "G mean", "B mean", "R std", "G std", "B std")
    charts = [
        plots.histogram_panel(
            {"real": real.features[:, i], "synthetic": synthetic.features[:, i]}, name
        )
        for i, name in enumerate(names)
    ]
    return plots.panels(charts, 3, "per-image channel mean and std, in [0, 1]")


FLOOR_METRICS = (FID, KID_MEAN, "precision", "recall", "density", "coverage")


def _rows(n: int, size: int, seed: int) -> np.ndarray:
    return _subsample(n, size, np.random.default_rng(seed))


def same_size_floor(
    real: Features, synthetic: Features, floor: Features, metric_args: dict[str, Any]
) -> dict[str, Any]:
    """Each metric of synthetic vs real beside the same metric of another real patient set vs
    real (the floor), with the compared sets cut to one size per class (FID and KID depend on
    set size), and the ratio synthetic / floor for FID and KID (1 = as close as real data)."""

    def pair(real_x, synthetic_x, floor_x, seed) -> dict[str, Any]:
        n = min(len(synthetic_x), len(floor_x))
        synthetic_x = synthetic_x[_rows(len(synthetic_x), n, seed)]
        floor_x = floor_x[_rows(len(floor_x), n, seed + 1)]
        ours = fidelity_metrics(real_x, synthetic_x, **metric_args)
        base = fidelity_metrics(real_x, floor_x, **metric_args)
        ratio = {
            key: ours[key] / base[key]
            for key in (FID, KID_MEAN)
            if ours[key] is not None and base[key] is not None and base[key] > 0
        }
        return {
            "images": n,
            "synthetic": {k: ours[k] for k in FLOOR_METRICS},
            "real_vs_real": {k: base[k] for k in FLOOR_METRICS},
            "ratio": ratio,
        }

    seed = metric_args["seed"]
    result = {"overall": pair(real.features, synthetic.features, floor.features, seed)}
    result["per_class"] = {
        str(label): pair(
            real.features[real.labels == label],
            synthetic.features[synthetic.labels == label],
            floor.features[floor.labels == label],
            seed,
        )
        for label in sorted(set(real.labels.tolist()) & set(synthetic.labels.tolist()))
        if (floor.labels == label).sum() >= 2
    }
    return result


def equal_pools(train: Features, heldout: Features, seed: int) -> tuple[Features, Features]:
    """Both memorisation references cut to the smaller one's size per class (seeded): a larger
    pool has closer nearest neighbours by its size alone, so unequal pools are not comparable."""
    keep_train, keep_heldout = [], []
    for label in sorted(set(train.labels.tolist()) | set(heldout.labels.tolist())):
        t, h = np.flatnonzero(train.labels == label), np.flatnonzero(heldout.labels == label)
        n = min(len(t), len(h))
        keep_train.append(t[_rows(len(t), n, seed)])
        keep_heldout.append(h[_rows(len(h), n, seed + 1)])
    return (
        train.select(np.sort(np.concatenate(keep_train))),
        heldout.select(np.sort(np.concatenate(keep_heldout))),
    )


def equal_pool_medians(
    synthetic: Features, train: Features, heldout: Features, threshold: float, seed: int, device
) -> dict[str, Any]:
    """Median nearest distances of the synthetic images to the training and the held-out pool,
    both cut to one size per class (equal_pools): comparable, where the raw medians are not."""
    train_eq, heldout_eq = equal_pools(train, heldout, seed)
    summary = memorisation(
        synthetic.features, train_eq.features, heldout_eq.features, synthetic.labels, threshold,
        device,
    ).summary()  # fmt: skip
    return {
        "images_each": len(train_eq),
        "pool_sizes": {"train": len(train), "heldout": len(heldout)},
        "train_distance_median": summary["train_distance_median"],
        "heldout_distance_median": summary["heldout_distance_median"],
    }


def run_fidelity(
    config: FidelityConfig, progress=None, log: Callable[[str], None] | None = None
) -> Path:
    """Compute every metric per extractor; write OUT/fidelity.json (last) and the PNGs.
    Returns the path of fidelity.json. Skipped when it exists for the same settings.
    `features_only`: this process's share of the feature pass only (`precompute_features`)."""
    if config.features_only:
        precompute_features(config, progress, log)
        return Path(config.out) / FEATURES_DIR
    started = time.perf_counter()
    say = log or (lambda text: None)
    validate(config)
    # compared with a finished result: one folder spelled two ways is the same input
    config = with_resolved_paths(config, "real", "synthetic", "classifier_run")
    out = Path(config.out)
    result_path = out / FIDELITY

    # What to compare, and with what (manifests only; a named extractor that cannot run stops
    # the job here, before any image is read).
    names, skipped = resolve_extractors(config)
    real = real_source(config.real, config.real_pool)
    synthetic = synthetic_sources(config.synthetic)
    real_manifest = load_manifest(Path(config.real))
    unseen = list(dict.fromkeys((config.real_pool, config.heldout_pool)))  # what it is tested on
    for source in synthetic:
        check_provenance(
            Path(config.real), real_manifest, unseen, source.root, load_manifest(source.root)
        )
    train = heldout = None
    pools = real_manifest["pools"]
    missing = [p for p in (config.train_pool, config.heldout_pool) if p not in pools]
    if missing:
        skipped["memorisation"] = (
            f"{config.real} has no pool {', '.join(map(repr, missing))} (pools: "
            f"{', '.join(pools)}): memorisation needs the training and a held-out pool"
        )
    else:
        train = real_source(config.real, config.train_pool)
        heldout = real_source(config.real, config.heldout_pool)
    floor = None
    if config.floor_pool in pools:
        floor = real_source(config.real, config.floor_pool)
    else:
        skipped["floor"] = f"{config.real} has no pool {config.floor_pool!r}: no real-vs-real floor"
    data = {
        "real": _data_entry([real]),
        "synthetic": _data_entry(synthetic),
        "train": _data_entry([train]) if train else None,
        "heldout": _data_entry([heldout]) if heldout else None,
        "floor": _data_entry([floor]) if floor else None,
    }
    # SiFID of the generate-singan folders (a named space that cannot run stops here too)
    sifid_plan = None
    if config.sifid:
        from synthbreast.eval.sifid import plan as plan_sifid

        sifid_plan = plan_sifid(
            [s.root for s in synthetic], config.sifid_space, config.weights_path
        )
    if _reuse(result_path, config, data):
        say(f"{result_path} exists for these settings and data: skipped (--force to redo)")
        return result_path
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG)
    device = choose_device(config.device)
    cache_dir = out / FEATURES_DIR
    histology = None
    if "histology" in names and "train" not in pools:
        if config.extractors:
            raise UserError(f"--extractor histology trains on {config.real}'s train pool: none")
        names.remove("histology")
        skipped["histology"] = f"{config.real} has no train pool to train the histology space on"
    if "histology" in names:  # trained once per ingest, shared by every fidelity run on it
        histology = histology_run(
            config.real, config.histology_cache or cache_dir, config.seed, config.device,
            progress=progress, log=say,
        )  # fmt: skip
    options = ExtractorOptions(
        config.pixels_side, config.weights_path, config.classifier_run,
        str(histology) if histology else None,
    )  # fmt: skip
    extractors = [build_extractor(name, options) for name in names]  # weights read here

    def features_of(sources: Sequence[Source], extractor: Extractor) -> Features:
        parts = [
            cached_features(
                s, extractor, cache_dir, device, config.batch_size, config.workers, progress
            )
            for s in sources
        ]
        return concatenate(parts)

    # Per-image channel statistics: the histograms.
    channels = channels_extractor()
    real_channels, synthetic_channels = (
        features_of([real], channels),
        features_of(synthetic, channels),
    )
    save_png(histograms_chart(real_channels, synthetic_channels), out / HISTOGRAMS_PNG)
    result: dict[str, Any] = {
        "schema": FIDELITY_SCHEMA,
        "config": to_dict(config),
        "data": data,
        "extractors": {},
        "skipped": skipped,
        "channels": {
            "real": channel_summary(real_channels),
            "synthetic": channel_summary(synthetic_channels),
        },
        "histograms_png": HISTOGRAMS_PNG,
    }

    # Per extractor: features -> statistics -> metrics, overall and per class; memorisation.
    metric_args = {
        "k": config.nearest_k,
        "kid_subsets": config.kid_subsets,
        "kid_subset_size": config.kid_subset_size,
        "seed": config.seed,
        "device": device,
    }
    for extractor in extractors:
        began = time.perf_counter()
        say(f"{extractor.name}: features")
        real_f, synthetic_f = features_of([real], extractor), features_of(synthetic, extractor)
        say(f"{extractor.name}: FID, KID, PRDC on {len(real_f)} real, {len(synthetic_f)} synthetic")
        entry: dict[str, Any] = {
            "dim": extractor.dim,
            "settings": extractor.settings,
            "overall": fidelity_metrics(real_f.features, synthetic_f.features, **metric_args),
            "per_class": {},
        }
        for label in sorted(set(real_f.labels.tolist()) | set(synthetic_f.labels.tolist())):
            entry["per_class"][str(label)] = fidelity_metrics(
                real_f.features[real_f.labels == label],
                synthetic_f.features[synthetic_f.labels == label],
                **metric_args,
            )
        if floor is not None:
            floor_f = features_of([floor], extractor)
            entry["floor"] = same_size_floor(real_f, synthetic_f, floor_f, metric_args)
            entry["floor"]["pool"] = config.floor_pool
        if train is not None and heldout is not None:
            say(f"{extractor.name}: memorisation")
            train_f, heldout_f = features_of([train], extractor), features_of([heldout], extractor)
            # copies are looked for in the whole training pool (a copy of an image left out
            # would be missed); the distance medians are compared on pools of equal size
            found = memorisation(
                synthetic_f.features,
                train_f.features,
                heldout_f.features,
                synthetic_f.labels,
                config.copy_threshold,
                device,
            )
            summary = found.summary()
            summary["train_images"] = len(train_f)
            summary["equal_pools"] = equal_pool_medians(
                synthetic_f, train_f, heldout_f, config.copy_threshold, config.seed, device
            )
            grid, listing = closest_pairs_grid(
                found, synthetic_f, train_f, heldout_f, config.closest_pairs
            )
            png = f"closest-pairs-{extractor.name}.png"
            save_png(grid, out / png)
            summary["closest_pairs_png"] = png
            summary["closest"] = listing
            entry["memorisation"] = summary
        chart, ratio = pca_scatter(real_f, synthetic_f, extractor.name, config.seed)
        entry["pca_png"] = f"pca-{extractor.name}.png"
        entry["pca_explained_variance"] = ratio
        save_png(chart, out / entry["pca_png"])
        if config.tsne:
            entry["tsne_png"] = f"tsne-{extractor.name}.png"
            save_png(
                tsne_scatter(real_f, synthetic_f, extractor.name, config.seed),
                out / entry["tsne_png"],
            )
        entry["seconds"] = round(time.perf_counter() - began, 3)
        result["extractors"][extractor.name] = entry

    if sifid_plan is not None:
        from synthbreast.eval.sifid import sifid_section

        began = time.perf_counter()
        result["sifid"] = sifid_section(
            sifid_plan, Path(config.real), config.real_pool, config.sifid_floor_images,
            config.sifid_variants, config.copy_threshold, config.seed, config.weights_path,
            device, say,
        )  # fmt: skip
        result["sifid"]["seconds"] = round(time.perf_counter() - began, 3)
    elif not config.sifid and any(_singan(s) for s in synthetic):
        skipped["sifid"] = "--no-sifid"

    shown = [n for n in PREFERRED if n in result["extractors"]]
    result["pca_png"] = result["extractors"][shown[0]]["pca_png"] if shown else None
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["device"] = str(device)
    result["created_by"] = f"synthbreast {__version__}"
    atomic_write_json(result_path, result)
    return result_path


# --- the feature pass over processes and array tasks ------------------------------------------


def balanced_share(weights: Sequence[int], kinds: Sequence[int], worker: int, workers: int):
    """The items (indices) that process `worker` of `workers` takes: each kind's items (one
    kind per extractor) dealt, heaviest first, to the process with the least of that kind's
    weight (images) so far, ties to the next process in turn. Every process computes the same
    deal from the same list, so the shares are disjoint and cover every item, without talking.
    A plain rank::world split of a list where a costly and a cheap extractor alternate gave
    one process every costly item (0.75 scaling at 2 processes, bench/feature_speed.py)."""
    owner = {}
    for turn, kind in enumerate(dict.fromkeys(kinds)):
        load = [0] * workers
        ours = [k for k in range(len(weights)) if kinds[k] == kind]
        for k in sorted(ours, key=lambda k: (-weights[k], k)):
            w = min(range(workers), key=lambda j: (load[j], (j - turn) % workers))
            owner[k] = w
            load[w] += weights[k]
    return [k for k in range(len(weights)) if owner[k] == worker]


def precompute_features(
    config: FidelityConfig,
    progress=None,
    log: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`fidelity --features-only`: this process's share of the features a fidelity run reads
    (every extractor, every pool it compares), into OUT/features, then stop; `fidelity` then
    finds them cached. The (shard, extractor) items are shared among the array's tasks x
    torchrun's ranks (`balanced_share`): each process takes the same share of every
    extractor's images, so none waits on another that drew the costly ones. Processes never
    talk: each writes its own shards' cache files, atomically. The histology space is trained,
    and its features computed, by the fidelity run itself (a small CNN at the patches' size:
    its pass is cheap). Returns what this process did."""
    from synthbreast.generate import process_label, process_rank, slurm_task

    started = time.perf_counter()
    env = os.environ if env is None else env
    say = log or (lambda text: None)
    validate(config)
    config = with_resolved_paths(config, "real", "synthetic", "classifier_run")
    names, _ = resolve_extractors(config)
    left_out = [name for name in names if name == "histology"]
    names = [name for name in names if name != "histology"]
    pools = load_manifest(Path(config.real))["pools"]
    others = [config.floor_pool, config.train_pool, config.heldout_pool]  # each when there
    real = [real_source(config.real, config.real_pool)]  # an unknown --real-pool stops here
    real += [real_source(config.real, p) for p in dict.fromkeys(others) if p in pools]
    real = list({source.pool: source for source in real}.values())
    synthetic = synthetic_sources(config.synthetic)
    sources = real + synthetic
    options = ExtractorOptions(config.pixels_side, config.weights_path, config.classifier_run)
    extractors = [build_extractor(name, options) for name in names]
    channels = channels_extractor()  # the histograms: the compared real pool and synthetic
    with_channels = {0, *range(len(real), len(sources))}
    items = []  # (extractor index, source index, shard index); channels is index -1
    for s, source in enumerate(sources):
        for i in range(len(source.shards)):
            items += [(e, s, i) for e in range(len(extractors))]
            if s in with_channels:
                items.append((-1, s, i))
    rank, world = process_rank(env)
    task, tasks = slurm_task(env) or (0, 1)
    weights = [sources[s].shard_images[i] for _, s, i in items]
    kinds = [e for e, _, _ in items]
    chosen = balanced_share(weights, kinds, task * world + rank, tasks * world)
    mine = [items[k] for k in chosen]
    device = choose_device(config.device)
    cache_dir = Path(config.out) / FEATURES_DIR
    computed = reused = images = 0
    computing = time.perf_counter()
    for e, extractor in [(-1, channels), *enumerate(extractors)]:
        shards = [(s, i) for f, s, i in mine if f == e]
        if shards:
            _, done, found = features_share(
                sources, extractor, cache_dir, device, shards, config.batch_size,
                config.workers, progress,
            )  # fmt: skip
            computed, reused = computed + done, reused + found
            images += sum(sources[s].shard_images[i] for s, i in shards)
    summary = {
        "rank": rank,
        "world": world,
        "items": len(mine),
        "of_items": len(items),
        "images": images,  # images embedded or found, counted once per extractor
        "computed": computed,
        "reused": reused,
        "seconds": round(time.perf_counter() - started, 3),
        "compute_seconds": round(time.perf_counter() - computing, 3),
        "cache": str(cache_dir),
        "extractors": ["channels", *names],
        "left_out": left_out,
    }
    say(
        f"fidelity features ({process_label(env)}): {len(mine)} of {len(items)} (shard, "
        f"extractor) items, {computed} computed, {reused} already cached, "
        f"{summary['seconds']:.1f} s -> {cache_dir}"
    )
    if left_out:
        say("fidelity features: histology is trained and embedded by the fidelity run itself")
    return summary
