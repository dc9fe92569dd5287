"""Memorisation: exact copies of training images are flagged, unseen images are not; the blocked
nearest-neighbour search equals a brute-force one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthbreast.config import FidelityConfig
from synthbreast.data.shards import (
    SCHEMA,
    Sample,
    image_bytes,
    iter_shard,
    load_manifest,
    pool_shards,
    save_manifest,
    write_shard,
)
from synthbreast.eval.fidelity import run_fidelity
from synthbreast.eval.memorisation import (
    CONTROL_SHARE,
    SHARE,
    kth_neighbour_distances,
    memorisation,
    nearest_neighbours,
    nearest_with_ratio,
)


def write_synthetic_folder(out: Path, samples: list[Sample], label: int, per_shard: int = 50):
    """A folder as `synthbreast generate` writes it: shards of pool "synthetic", one class,
    a complete manifest (the fields readers use, as in synthbreast.generate.new_manifest)."""
    out.mkdir(parents=True)
    entries = []
    for i, start in enumerate(range(0, len(samples), per_shard)):
        entry = write_shard(out / f"synthetic-{i:06d}.tar", samples[start : start + per_shard])
        entries.append({"pool": "synthetic", **entry})
    n = len(samples)
    manifest = {
        "schema": SCHEMA,
        "status": "complete",
        "source": {"synthetic": True, "real": False, "class_names": ["0", "1"]},
        "pools": {
            "synthetic": {
                "patients": ["synthetic"],
                "images": n,
                "counts": {str(label): n},
                "shards": [e["name"] for e in entries],
            }
        },
        "shards": entries,
        "totals": {"images": n},
    }
    save_manifest(out, manifest)
    return out


def real_samples(shards: Path, pool: str, label: int) -> list[dict]:
    manifest = load_manifest(shards)
    return [
        s
        for path in pool_shards(shards, manifest, pool)
        for s in iter_shard(path)
        if int(s["cls"]) == label
    ]


def as_synthetic(raw: list[dict], label: int) -> list[Sample]:
    """Real samples re-keyed as synthetic ones; the original key kept in the metadata."""
    return [
        Sample(f"syn-{i:06d}", image_bytes(s), label, {"synthetic": True, "of": s["__key__"]})
        for i, s in enumerate(raw)
    ]


# --- the search ----------------------------------------------------------------------------


def test_blocked_search_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    refs = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    queries = torch.randn(130, 24, generator=gen, dtype=torch.float64)
    full = torch.cdist(queries, refs).topk(3, largest=False)
    d, i = nearest_neighbours(queries, refs, k=3, row_block=32, column_block=50)
    assert torch.equal(i, full.indices)
    assert torch.allclose(d, full.values, atol=1e-9)

    refs[7] = refs[3]  # an exact duplicate: its neighbour at distance 0, not itself
    own = torch.cdist(refs, refs).fill_diagonal_(float("inf"))
    d, i = nearest_neighbours(refs, refs, k=1, exclude_self=True, row_block=64, column_block=33)
    assert torch.allclose(d[:, 0], own.min(1).values, atol=1e-9)
    assert i[3, 0] == 7 and i[7, 0] == 3 and d[3, 0] == 0
    radii = kth_neighbour_distances(refs, 5, row_block=41, column_block=77)
    assert torch.allclose(radii, own.topk(5, largest=False).values[:, 4], atol=1e-9)


def test_ratio_is_distance_over_the_training_images_own_spacing():
    train = np.array([[0.0], [1.0], [3.0], [3.0]])  # spacings 1, 1, 0, 0 (a duplicate)
    queries = np.array([[0.1], [1.4], [3.0], [2.6]])
    found = nearest_with_ratio(queries, train)
    assert found.index.tolist()[:2] == [0, 1]
    assert found.ratio[:2] == pytest.approx([0.1, 0.4])
    assert found.ratio[2] == 0  # on a duplicated training image: a copy
    assert found.ratio[3] == np.inf  # beside one: spacing 0, not a copy


def test_shares_on_feature_arrays():
    rng = np.random.default_rng(0)
    train, heldout = rng.normal(size=(400, 16)), rng.normal(size=(200, 16))
    copies = train[:100] + rng.normal(scale=1e-3, size=(100, 16))  # near copies
    fresh = rng.normal(size=(100, 16))
    labels = np.r_[np.zeros(100, int), np.ones(100, int)]
    summary = memorisation(np.r_[copies, fresh], train, heldout, labels, 0.5).summary()
    assert summary["per_class"]["0"][SHARE] == 1.0
    assert summary["per_class"]["1"][SHARE] <= 0.05
    assert summary[CONTROL_SHARE] <= 0.05
    assert summary["real_share_below_threshold"] <= 0.05
    assert summary["train_distance_median"] < summary["heldout_distance_median"]


# --- on shards, through the job ---------------------------------------------------------------


@pytest.fixture(scope="module")
def copies_and_fresh(demo_shards, tmp_path_factory) -> Path:
    """class 0: exact copies of GAN-pool images; class 1: images of patients the GAN never saw
    (the real train pool), i.e. what a generator that generalises perfectly would make."""
    root = tmp_path_factory.mktemp("synthetic")
    copies = as_synthetic(real_samples(demo_shards, "gan", 0), 0)
    fresh = as_synthetic(real_samples(demo_shards, "train", 1), 1)
    write_synthetic_folder(root / "class0", copies, 0)
    write_synthetic_folder(root / "class1", fresh, 1)
    return root


def test_copies_are_flagged_and_fresh_images_are_not(demo_shards, copies_and_fresh, tmp_path):
    config = FidelityConfig(
        real=str(demo_shards),
        synthetic=[str(copies_and_fresh)],
        out=str(tmp_path / "fidelity"),
        extractors=["pixels"],
        kid_subsets=5,
        workers=0,
    )
    result = json.loads(run_fidelity(config).read_text())
    memo = result["extractors"]["pixels"]["memorisation"]
    assert memo["per_class"]["0"][SHARE] == 1.0  # every copy found
    assert memo["per_class"]["1"][SHARE] <= 0.05  # unseen patients are not copies
    assert memo["per_class"]["0"][CONTROL_SHARE] <= 0.05  # and copies are far from the test pool
    copies = memo["per_class"]["0"]["synthetic_images"]
    assert memo[SHARE] == pytest.approx(copies / memo["synthetic_images"])
    assert memo["real_share_below_threshold"] <= 0.05

    # The closest pairs are the copies, each next to the very image it copies.
    originals = {
        s["__key__"]: json.loads(s["json"])["of"]
        for path in sorted((copies_and_fresh / "class0").glob("*.tar"))
        for s in iter_shard(path)
    }
    for pair in memo["closest"]:
        assert pair["distance"] == pytest.approx(0, abs=1e-3)
        assert originals[pair["synthetic"]] == pair["train"]
    grid = np.asarray(Image.open(tmp_path / "fidelity" / memo["closest_pairs_png"]))
    top = 14 + 2  # make_grid: title band, then the pad
    tile = 50 * 2  # 50 px patches at scale 2
    synthetic_tile = grid[top : top + tile, 2 : 2 + tile]
    train_tile = grid[top : top + tile, 2 + tile + 2 : 2 + 2 * tile + 2]
    assert np.array_equal(synthetic_tile, train_tile)
