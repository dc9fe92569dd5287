"""`classify --features-only` and `fidelity --features-only`: the feature passes split over
Slurm array tasks and torchrun ranks fill the same cache as one process does, and `classify`
and `fidelity` then reuse it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import ClassifyConfig, FidelityConfig
from synthbreast.eval.classify import precompute_features, run_classify
from synthbreast.eval.fidelity import balanced_share, run_fidelity
from synthbreast.eval.fidelity import precompute_features as precompute_fidelity_features
from tests.conftest import REPO
from tests.test_scenarios import make_synthetic


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


def features_job(out: Path, real: Path, synthetic: Path, **overrides) -> ClassifyConfig:
    settings = dict(
        out=str(out), real=str(real), synthetic=[str(synthetic)], weights="none",
        input_size="native", epochs=2, batch_size=8, n_boot=50, features_only=True,
    )  # fmt: skip
    return ClassifyConfig(**{**settings, **overrides})


def cache_files(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every cached shard's tensors under a feature cache root, by relative path."""
    return {str(p.relative_to(root)): load_file(p) for p in root.glob("*/*.safetensors")}


def assert_same_cache(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name, tensors in expected.items():
        torch.testing.assert_close(found[name]["features"], tensors["features"])
        assert torch.equal(found[name]["labels"], tensors["labels"])


def two_ranks(*args: str) -> str:
    """`synthbreast ARGS` under torchrun with 2 ranks of 1 thread (outside any Slurm job);
    its output, after checking it succeeded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD"))}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "synthbreast", *args,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def test_array_tasks_and_ranks_share_the_pass_and_classify_reuses_it(
    demo_shards, synthetic, tmp_path
):
    whole_run = precompute_features(features_job(tmp_path / "one", demo_shards, synthetic), env={})
    whole = cache_files(tmp_path / "one" / "features")
    # every scenario's shards once: the real train and test pools and both synthetic classes
    assert whole_run["shards"] == whole_run["of_shards"] == whole_run["computed"] == len(whole)
    assert len(whole) >= 8 and whole_run["not_planned"] == []

    split = tmp_path / "split"
    job = features_job(split, demo_shards, synthetic)
    shares = []
    for task in (0, 1):  # 2 array tasks, each of 2 torchrun ranks: 4 disjoint shares
        for rank in (0, 1):
            env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"}
            before = set(cache_files(split / "features"))  # none yet: an empty glob
            done = precompute_features(job, env={**env, "RANK": str(rank), "WORLD_SIZE": "2"})
            shares.append(set(cache_files(split / "features")) - before)
            assert done["computed"] == done["shards"] == len(shares[-1]) > 0
    assert sum(len(s) for s in shares) == len(whole)
    assert_same_cache(cache_files(split / "features"), whole)

    # more array tasks than shards: the last tasks' blocks are empty, not the whole set
    surplus = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "100"}  # block [0, 0)
    assert precompute_features(job, env=surplus)["shards"] == 0

    again = precompute_features(job, env={})  # all cached: nothing computed
    assert again["computed"] == 0 and again["reused"] == len(whole)
    for scenario in ("real-real", "synth-real"):
        run = run_classify(dataclasses.replace(job, features_only=False, scenario=scenario))
        shards = json.loads((run / "metrics.json").read_text())["model"]["feature_shards"]
        assert shards["computed"] == 0 and shards["reused"] > 0, (scenario, shards)


def test_torchrun_ranks_fill_the_one_process_cache(demo_shards, synthetic, tmp_path):
    precompute_features(features_job(tmp_path / "one", demo_shards, synthetic), env={})
    output = two_ranks(
        "classify", "--features-only", "--out", str(tmp_path / "two"), "--real", str(demo_shards),
        "--synthetic", str(synthetic), "--weights", "none", "--input-size", "native",
    )  # fmt: skip
    lines = [line for line in output.splitlines() if line.startswith("features (rank")]
    assert len(lines) == 2 and {line.split(")")[0] for line in lines} == {
        "features (rank 0 of 2",
        "features (rank 1 of 2",
    }, output[-3000:]
    two, one = (cache_files(tmp_path / name / "features") for name in ("two", "one"))
    assert_same_cache(two, one)


def test_features_only_without_a_cache_is_one_line(demo_shards, synthetic, tmp_path):
    result = CliRunner().invoke(
        app,
        ["classify", "--features-only", "--mode", "finetune", "--out", str(tmp_path / "o"),
         "--real", str(demo_shards), "--synthetic", str(synthetic)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--features-only fills the feature cache of a frozen backbone" in result.output
    assert "Traceback" not in result.output


# --- fidelity's feature pass -------------------------------------------------------------------


def fidelity_job(out: Path, real: Path, synthetic: Path, **overrides) -> FidelityConfig:
    settings = dict(
        out=str(out), real=str(real), synthetic=[str(synthetic)], workers=1, kid_subsets=10,
        extractors=["pixels", "texture", "histology"], features_only=True,
    )  # fmt: skip
    return FidelityConfig(**{**settings, **overrides})


def fidelity_cache(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return cache_files(out / "features")


def test_fidelity_features_split_over_tasks_and_ranks_then_reused(demo_shards, synthetic, tmp_path):
    whole_run = precompute_fidelity_features(
        fidelity_job(tmp_path / "one", demo_shards, synthetic), env={}
    )
    whole = fidelity_cache(tmp_path / "one")
    # per shard: pixels and texture of every pool compared (test, train, gan) and of the
    # synthetic set, channels of the test pool and the synthetic set; histology left out
    assert whole_run["extractors"] == ["channels", "pixels", "texture"]
    assert whole_run["left_out"] == ["histology"]
    assert whole_run["items"] == whole_run["of_items"] == whole_run["computed"] == len(whole)
    assert {name.split("-")[0] for name in whole} == {"channels", "pixels", "texture"}

    split = tmp_path / "split"
    job = fidelity_job(split, demo_shards, synthetic)
    shares = []
    for task in (0, 1):  # 2 array tasks of 2 ranks each: 4 disjoint shares of one cache
        for rank in (0, 1):
            env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"}
            before = set(fidelity_cache(split))
            done = precompute_fidelity_features(
                job, env={**env, "RANK": str(rank), "WORLD_SIZE": "2"}
            )
            shares.append(set(fidelity_cache(split)) - before)
            assert done["computed"] == done["items"] == len(shares[-1]) > 0
            # every share holds each extractor's items alike (balanced_share)
            assert {name.split("-")[0] for name in shares[-1]} >= {"pixels", "texture"}
    assert sum(len(s) for s in shares) == len(whole)
    assert_same_cache(fidelity_cache(split), whole)

    # the fidelity run itself embeds nothing the split did (histology's features it makes)
    stamps = {p: p.stat().st_mtime_ns for p in (split / "features").glob("*/*.safetensors")}
    result = run_fidelity(dataclasses.replace(job, features_only=False))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    made = set(fidelity_cache(split)) - set(whole)
    assert made and {name.split("-")[0] for name in made} == {"histology"}
    assert set(json.loads(result.read_text())["extractors"]) == {"pixels", "texture", "histology"}


def test_fidelity_features_under_torchrun_equal_one_process(demo_shards, synthetic, tmp_path):
    job = fidelity_job(tmp_path / "one", demo_shards, synthetic, extractors=["pixels"])
    precompute_fidelity_features(job, env={})
    output = two_ranks(
        "fidelity", "--features-only", "--out", str(tmp_path / "two"), "--real", str(demo_shards),
        "--synthetic", str(synthetic), "--extractor", "pixels", "--workers", "1",
    )  # fmt: skip
    lines = [line for line in output.splitlines() if line.startswith("fidelity features (rank")]
    assert sorted(line.split(")")[0] for line in lines) == [
        "fidelity features (rank 0 of 2",
        "fidelity features (rank 1 of 2",
    ], output[-3000:]
    assert_same_cache(fidelity_cache(tmp_path / "two"), fidelity_cache(tmp_path / "one"))


def test_balanced_share_deals_each_extractor_evenly_and_covers_every_item():
    # an extractor that costs much (kind 0) alternating with a cheap one (kind 1), shards of
    # 40 and 12 images: a rank::world split would give rank 0 every kind-0 item
    weights = [40, 40, 40, 40, 12, 12, 12, 12, 40, 40] * 2
    kinds = [0, 1] * 10
    for workers in (1, 2, 3, 4, 7):
        shares = [balanced_share(weights, kinds, w, workers) for w in range(workers)]
        assert sorted(k for share in shares for k in share) == list(range(len(weights)))
        for kind in (0, 1):
            loads = [sum(weights[k] for k in share if kinds[k] == kind) for share in shares]
            assert max(loads) - min(loads) <= 40, (workers, kind, loads)  # one shard at most
    two = [balanced_share(weights, kinds, w, 2) for w in range(2)]
    costly = [sum(weights[k] for k in share if kinds[k] == 0) for share in two]
    half = sum(w for w, k in zip(weights, kinds, strict=True) if k == 0) // 2
    assert costly == [half, half]
