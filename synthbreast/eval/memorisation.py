"""Memorisation: does the generator hand back its training images?

For each synthetic image s, in some feature space: its nearest training image t (the real `gan`
pool: what the GAN saw), the distance d(s, t), and the ratio

    ratio(s) = d(s, t) / d(t, t'),   t' = t's own nearest other training image.

The ratio measures d(s, t) in units of the local spacing of the training set around t, so it
means the same in dense and sparse regions and in any feature space. An exact copy has ratio 0.

Copy threshold, default 0.5: s counts as a copy when it lies closer to t than half the distance
from t to any other training image. Independent images from the same distribution seldom do:
with a locally even density in m intrinsic dimensions the chance is about 0.5^m (1 in 1,000 for
m = 10), while copies and near copies (re-encoded, slightly noised) sit near 0. A ratio below 1
alone is common for fresh images (s is then t's nearest neighbour, as often happens between two
unrelated samples), so 1 would flag a healthy generator.

Two references calibrate the share of "copies" found:
- control: the same ratio of each synthetic image against the held-out real `test` pool
  (patients the GAN never saw). A generator that copies is much closer to its training set
  than to unseen patients; one that generalises is about as close to both.
- real: the held-out real images against the training set, by the same rule: how often an
  unseen patient's image counts as a "copy", the rule's false-alarm rate on this data.

Nearest neighbours are found with blocked matrix products, never by looping over pairs; the
same search gives PRDC's k-NN radii (synthbreast.eval.fidelity).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

COPY_THRESHOLD = 0.5
ROW_BLOCK = 4096  # query rows per distance block
COLUMN_BLOCK = 8192  # reference columns per block: 4096 x 8192 float32 = 128 MiB

# Result keys (fidelity.json's "memorisation" entries).
THRESHOLD = "threshold"
SHARE = "share_below_threshold"
CONTROL_SHARE = "control_share_below_threshold"
REAL_SHARE = "real_share_below_threshold"
TRAIN_DISTANCE = "train_distance_median"
HELDOUT_DISTANCE = "heldout_distance_median"
TRAIN_RATIO = "train_ratio_median"
HELDOUT_RATIO = "heldout_ratio_median"


def as_tensor(x: Any, device: str | torch.device = "cpu") -> torch.Tensor:
    """Features as a 2-D float tensor on `device`: float64 stays float64, the rest float32."""
    t = torch.as_tensor(x)
    if t.dtype != torch.float64:
        t = t.float()
    return t.to(device)


# --- nearest neighbours in blocks --------------------------------------------------------------


def distance_blocks(
    queries: torch.Tensor,
    references: torch.Tensor,
    row_block: int = ROW_BLOCK,
    column_block: int = COLUMN_BLOCK,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(row offset, column offset, Euclidean distances) of every block of the distance matrix.

    |x|^2 - 2 x.y + |y|^2 with one matrix product per block; clamped at 0 before the root
    because rounding can make the square of a tiny distance negative.
    """
    query_norms = (queries * queries).sum(1)
    reference_norms = (references * references).sum(1)
    for r0 in range(0, len(queries), row_block):
        q = queries[r0 : r0 + row_block]
        for c0 in range(0, len(references), column_block):
            ref = references[c0 : c0 + column_block]
            squared = torch.addmm(
                query_norms[r0 : r0 + len(q), None] + reference_norms[None, c0 : c0 + len(ref)],
                q,
                ref.T,
                alpha=-2,
            )
            yield r0, c0, squared.clamp_min_(0).sqrt_()


def nearest_neighbours(
    queries: Any,
    references: Any,
    k: int = 1,
    exclude_self: bool = False,
    device: str | torch.device = "cpu",
    row_block: int = ROW_BLOCK,
    column_block: int = COLUMN_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices [N, k] of each query's k nearest references, nearest first.

    `exclude_self`: queries and references are the same set; an item is not its own neighbour
    (masked by index, not by distance, so exact duplicates still count as neighbours at 0).
    """
    q, ref = as_tensor(queries, device), as_tensor(references, device)
    if len(ref) - int(exclude_self) < k:
        raise ValueError(f"{k} nearest neighbours asked of {len(ref)} references")
    best_d = torch.full((len(q), k), math.inf, dtype=q.dtype, device=q.device)
    best_i = torch.zeros((len(q), k), dtype=torch.long, device=q.device)
    for r0, c0, d in distance_blocks(q, ref, row_block, column_block):
        rows = slice(r0, r0 + d.shape[0])
        columns = torch.arange(c0, c0 + d.shape[1], device=q.device)
        if exclude_self:
            own = torch.arange(r0, r0 + d.shape[0], device=q.device)[:, None] == columns[None]
            d = d.masked_fill(own, math.inf)
        take = min(k, d.shape[1])
        block_d, block_i = d.topk(take, dim=1, largest=False)
        merged_d = torch.cat([best_d[rows], block_d], 1)
        merged_i = torch.cat([best_i[rows], columns[block_i]], 1)
        order = merged_d.topk(k, dim=1, largest=False).indices
        best_d[rows] = merged_d.gather(1, order)
        best_i[rows] = merged_i.gather(1, order)
    return best_d, best_i


def kth_neighbour_distances(features: Any, k: int, **kwargs: Any) -> torch.Tensor:
    """Each item's distance to its k-th nearest other item of the same set (the PRDC radius)."""
    distances, _ = nearest_neighbours(features, features, k, exclude_self=True, **kwargs)
    return distances[:, k - 1]


@dataclass
class Matches:
    """Each query's nearest reference: its index, the distance, and the distance ratio."""

    index: np.ndarray  # [N] into the references
    distance: np.ndarray  # [N]
    ratio: np.ndarray  # [N] distance / that reference's own nearest-neighbour distance


def nearest_with_ratio(
    queries: Any,
    references: Any,
    spacing: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    **blocks: Any,
) -> Matches:
    """Nearest reference of each query, and the distance in units of the reference's spacing
    (each reference's distance to its nearest other reference; pass it when known)."""
    if spacing is None:
        spacing = kth_neighbour_distances(references, 1, device=device, **blocks)
    distance, index = nearest_neighbours(queries, references, 1, device=device, **blocks)
    distance, index = distance[:, 0], index[:, 0]
    own = spacing.to(distance)[index]
    # A reference with a duplicate in its own set has spacing 0: a query on it is a copy
    # (ratio 0), one beside it is not (inf).
    zero = torch.where(distance > 0, math.inf, 0.0).to(distance.dtype)
    ratio = torch.where(own > 0, distance / own.clamp_min(1e-30), zero)
    return Matches(index.cpu().numpy(), distance.cpu().numpy(), ratio.cpu().numpy())


def _median(values: np.ndarray) -> float | None:
    if len(values) == 0:
        return None
    value = float(np.median(values))
    return value if math.isfinite(value) else None


def _share(ratio: np.ndarray, threshold: float) -> float | None:
    return float((ratio < threshold).mean()) if len(ratio) else None


@dataclass
class Memorisation:
    threshold: float
    train: Matches  # synthetic -> training (gan pool)
    heldout: Matches  # synthetic -> held-out real (test pool): the control
    real: Matches  # held-out real -> training: the rule's false-alarm rate
    synthetic_labels: np.ndarray

    def summary(self) -> dict[str, Any]:
        t = self.threshold
        result: dict[str, Any] = {
            THRESHOLD: t,
            SHARE: _share(self.train.ratio, t),
            CONTROL_SHARE: _share(self.heldout.ratio, t),
            REAL_SHARE: _share(self.real.ratio, t),
            TRAIN_DISTANCE: _median(self.train.distance),
            HELDOUT_DISTANCE: _median(self.heldout.distance),
            TRAIN_RATIO: _median(self.train.ratio),
            HELDOUT_RATIO: _median(self.heldout.ratio),
            "synthetic_images": len(self.train.ratio),
            "heldout_images": len(self.real.ratio),
        }
        result["per_class"] = {
            str(label): {
                SHARE: _share(self.train.ratio[self.synthetic_labels == label], t),
                CONTROL_SHARE: _share(self.heldout.ratio[self.synthetic_labels == label], t),
                "synthetic_images": int((self.synthetic_labels == label).sum()),
            }
            for label in np.unique(self.synthetic_labels).tolist()
        }
        return result

    def closest(self, count: int) -> list[int]:
        """Synthetic indices of the `count` smallest training ratios (ties: smaller distance)."""
        order = np.lexsort((self.train.distance, self.train.ratio))
        return order[:count].tolist()


def memorisation(
    synthetic: Any,
    train: Any,
    heldout: Any,
    synthetic_labels: Any,
    threshold: float = COPY_THRESHOLD,
    device: str | torch.device = "cpu",
    **blocks: Any,
) -> Memorisation:
    """Nearest training and held-out images of every synthetic one, and of the held-out ones."""
    if len(train) < 2 or len(heldout) < 2:
        raise ValueError("memorisation needs at least 2 training and 2 held-out images")
    # each training image's spacing is needed twice, and is the costliest search: once
    train_spacing = kth_neighbour_distances(train, 1, device=device, **blocks)
    return Memorisation(
        threshold,
        nearest_with_ratio(synthetic, train, train_spacing, device, **blocks),
        nearest_with_ratio(synthetic, heldout, None, device, **blocks),
        nearest_with_ratio(heldout, train, train_spacing, device, **blocks),
        np.asarray(synthetic_labels),
    )
