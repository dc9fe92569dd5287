"""The scenario registry: fixed order, index = name, and which images each scenario uses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from synthbreast.config import GenerateConfig
from synthbreast.data.shards import iter_shard, load_manifest, save_manifest
from synthbreast.errors import UserError
from synthbreast.eval.scenarios import (
    SCENARIOS,
    DataPlan,
    keep_mask,
    plan_scenario,
    resolve_scenario,
    scenario_names,
)
from synthbreast.generate import run_generate
from tests.test_generate import make_run

ORDER = ["real-real", "synth-synth", "real-synth", "synth-real", "real+synth-real"]


def make_synthetic(root: Path, shards: int = 2, per_shard: int = 12, size: int = 50) -> Path:
    """OUT/synthetic as the pipeline makes it: class0/ and class1/ generate folders, from an
    untrained tiny MSG-GAN (real generate manifests and shards, no training needed)."""
    run = make_run(root / "gan", class_label=None)
    for label in (0, 1):
        job = GenerateConfig(
            checkpoint=str(run),
            out=str(root / "synthetic" / f"class{label}"),
            shards=shards,
            per_shard=per_shard,
            class_label=label,
            seed=label,  # other latents per class
            output_size=size,
            batch_size=per_shard,
        )
        run_generate(job, env={})  # all shards, whatever Slurm variables the test runs under
    return root / "synthetic"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


def samples_of(plan: DataPlan, seed: int = 0) -> list[tuple[str, str, int, str, bool]]:
    """(shard sha256, key, label, patient, synthetic) of every sample a plan uses."""
    chosen = []
    for part in plan.parts:
        rows = []
        for ref in part.shards:
            for sample in iter_shard(ref.path):
                meta = json.loads(sample["json"])
                row = (ref.sha256, sample["__key__"], int(sample["cls"]), meta["patient"])
                rows.append((*row, bool(meta.get("synthetic"))))
        labels = [r[2] for r in rows]
        keep = keep_mask(part, [r[0] for r in rows], [r[1] for r in rows], labels, seed)
        chosen += [r for r, k in zip(rows, keep, strict=True) if k]
    return chosen


def test_registry_order_is_fixed_and_index_equals_name():
    assert scenario_names() == ORDER == list(SCENARIOS)
    for index, name in enumerate(ORDER):
        by_index, by_name, both = (
            resolve_scenario(None, index),
            resolve_scenario(name, None),
            resolve_scenario(name, index),
        )
        assert by_index == by_name == both == (SCENARIOS[name], index)
    paper = [SCENARIOS[n].paper_accuracy for n in ORDER]
    assert paper == [0.84, 0.99, 0.81, 0.76, None]


@pytest.mark.parametrize(
    ("name", "task_id", "message"),
    [
        (None, None, "--scenario NAME"),
        ("real-real", 1, "disagree"),
        (None, 5, "out of range"),
        ("nope", None, "unknown"),
    ],
)
def test_bad_scenario_choices(name, task_id, message):
    with pytest.raises(UserError, match=message):
        resolve_scenario(name, task_id)


def test_real_real_trains_on_train_patients_and_tests_on_unseen_ones(demo_shards):
    plan = plan_scenario(SCENARIOS["real-real"], 0, demo_shards, [])
    manifest = load_manifest(demo_shards)
    train_names = {r.path.name for p in plan.train.parts for r in p.shards}
    test_names = {r.path.name for p in plan.test.parts for r in p.shards}
    assert train_names == set(manifest["pools"]["train"]["shards"])
    assert test_names == set(manifest["pools"]["test"]["shards"])
    assert plan.train.patient_level and plan.test.patient_level
    patients = {
        which: {row[3] for row in samples_of(getattr(plan, which))} for which in ("train", "test")
    }
    assert len(patients["train"]) == len(manifest["pools"]["train"]["patients"]) > 1
    assert patients["test"] == set(manifest["pools"]["test"]["patients"])
    assert not patients["train"] & patients["test"], "no patient in both"
    assert plan.train.manifests()[0]["path"] == str(demo_shards / "manifest.json")


def test_synthetic_split_is_70_30_disjoint_and_deterministic(synthetic):
    scenario = SCENARIOS["synth-synth"]
    plan = plan_scenario(scenario, 1, None, [synthetic])
    assert not plan.test.patient_level
    train, test = samples_of(plan.train), samples_of(plan.test)
    train_ids, test_ids = {r[:2] for r in train}, {r[:2] for r in test}
    assert not train_ids & test_ids
    assert len(train_ids | test_ids) == 48, "every synthetic image in one of the two"
    assert 0.5 < len(train) / 48 < 0.9
    assert {r[2] for r in train} == {0, 1}
    assert samples_of(plan.train) == train, "same seed, same split"
    assert samples_of(plan.train, seed=1) != train, "another seed, another split"
    # the parent folder and the class folders named one by one are the same data
    folders = [synthetic / "class1", synthetic / "class0"]
    again = plan_scenario(scenario, 1, None, folders)
    assert sorted(samples_of(again.train)) == sorted(train)


def test_real_plus_synthetic_takes_ratio_per_class(demo_shards, synthetic):
    scenario = SCENARIOS["real+synth-real"]
    manifest = load_manifest(demo_shards)
    real_counts = manifest["pools"]["train"]["counts"]  # 80 / 80 in the demo fixture
    half = plan_scenario(scenario, 4, demo_shards, [synthetic], synth_ratio=0.1)
    rows = samples_of(half.train)
    synthetic_rows = [r for r in rows if r[4]]
    for label in (0, 1):
        wanted = round(0.1 * real_counts[str(label)])
        assert sum(r[2] == label for r in synthetic_rows) == wanted
    assert len(rows) - len(synthetic_rows) == sum(real_counts.values())
    everything = plan_scenario(scenario, 4, demo_shards, [synthetic], synth_ratio=1.0)
    synthetic_rows = [r for r in samples_of(everything.train) if r[4]]
    assert len(synthetic_rows) == 48, "capped at what exists"
    assert plan_scenario(scenario, 4, demo_shards, [synthetic], 0.1).train.parts[1].limit == {
        0: round(0.1 * real_counts["0"]),
        1: round(0.1 * real_counts["1"]),
    }


def test_missing_or_wrong_data_names_the_flag_and_the_fix(demo_shards, synthetic, tmp_path):
    with pytest.raises(UserError, match=r"--synthetic DIR.*synthbreast generate"):
        plan_scenario(SCENARIOS["synth-real"], 3, demo_shards, [])
    with pytest.raises(UserError, match=r"--real DIR.*synthbreast ingest"):
        plan_scenario(SCENARIOS["real-synth"], 2, None, [synthetic])
    with pytest.raises(UserError, match=r"no manifest\.json"):
        plan_scenario(SCENARIOS["synth-synth"], 1, None, [tmp_path])
    with pytest.raises(UserError, match="real shards go to --real"):
        plan_scenario(SCENARIOS["synth-synth"], 1, None, [demo_shards])
    with pytest.raises(UserError, match="synthetic shards"):
        plan_scenario(SCENARIOS["real-real"], 0, synthetic / "class0", [])
    # a generate job that has not finished
    unfinished = tmp_path / "unfinished"
    shutil.copytree(synthetic / "class0", unfinished)
    manifest = load_manifest(unfinished)
    manifest["status"] = "incomplete"
    save_manifest(unfinished, manifest)
    with pytest.raises(UserError, match="generation is not complete"):
        plan_scenario(SCENARIOS["synth-synth"], 1, None, [unfinished])
    # real-real needs no synthetic data at all
    assert plan_scenario(SCENARIOS["real-real"], 0, demo_shards, []).test.parts
