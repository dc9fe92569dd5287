"""The shard reader: every sample exactly once per epoch, under ranks x workers, decoded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from synthbreast.data.reader import shard_dataset
from synthbreast.data.shards import iter_shard, load_manifest, pool_count, pool_shards
from synthbreast.errors import UserError


def all_keys(root) -> Counter:
    keys = Counter()
    for shard in load_manifest(root)["shards"]:
        keys.update(s["__key__"] for s in iter_shard(root / shard["name"]))
    return keys


def test_pool_is_read_once_decoded_to_tensors(demo_shards):
    manifest = load_manifest(demo_shards)
    samples = list(shard_dataset(demo_shards, "gan"))
    assert len(samples) == pool_count(manifest, "gan")
    assert len({s["key"] for s in samples}) == len(samples)
    image = samples[0]["image"]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 50, 50)
    assert {s["label"] for s in samples} == {0, 1}
    assert {s["patient"] for s in samples} == set(manifest["pools"]["gan"]["patients"])


def test_class_filter(demo_shards):
    manifest = load_manifest(demo_shards)
    ones = list(shard_dataset(demo_shards, "train", classes=[1]))
    assert {s["label"] for s in ones} == {1}
    assert len(ones) == pool_count(manifest, "train", classes=[1])


def test_evaluation_order_is_deterministic_and_training_order_shuffles(demo_shards):
    plain = [s["key"] for s in shard_dataset(demo_shards, "gan")]
    assert plain == [s["key"] for s in shard_dataset(demo_shards, "gan")]
    dataset = shard_dataset(demo_shards, "gan", shuffle=True, seed=1, shuffle_buffer=50)
    first = [s["key"] for s in dataset]
    dataset.set_epoch(1)
    second = [s["key"] for s in dataset]
    assert sorted(first) == sorted(second) == sorted(plain)
    assert first != plain and first != second
    dataset.set_epoch(0)
    assert [s["key"] for s in dataset] == first  # same seed and epoch, same order


def test_two_workers_in_one_process_read_each_sample_once(demo_shards):
    dataset = shard_dataset(demo_shards, "gan")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    keys = Counter(s["key"] for s in loader)
    assert max(keys.values()) == 1
    assert len(keys) == pool_count(load_manifest(demo_shards), "gan")


def test_batches_collate(demo_shards):
    loader = torch.utils.data.DataLoader(shard_dataset(demo_shards, "test"), batch_size=8)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (8, 3, 50, 50)
    assert batch["label"].shape == (8,)


def test_unknown_pool_is_a_clear_error(demo_shards):
    with pytest.raises(UserError, match="no pool 'val'"):
        pool_shards(demo_shards, load_manifest(demo_shards), "val")


@pytest.mark.distributed
def test_two_ranks_by_two_workers_read_each_sample_once_per_epoch(demo_shards, tmp_path):
    assert len(load_manifest(demo_shards)["shards"]) >= 4
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).with_name("dist_reader.py")),
        str(demo_shards),
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = all_keys(demo_shards)
    for order in ("shuffle", "plain"):
        ranks = [json.loads((tmp_path / f"rank{r}-{order}.json").read_text()) for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2], "torchrun did not start 2 ranks"
        for epoch in range(2):
            got = Counter(key for r in ranks for key, _ in r["epochs"][epoch])
            assert got == expected, f"{order}: a sample was read twice or never"
            for r in ranks:
                workers = {worker for _, worker in r["epochs"][epoch]}
                assert workers == {0, 1}, f"{order}: a worker was idle"
