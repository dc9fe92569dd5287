"""One identity rule: each config field says whether it decides the job's outputs."""

from __future__ import annotations

import dataclasses

import pytest

from synthbreast import config as cfg
from synthbreast.config import (
    GenerateConfig,
    identity,
    identity_differences,
    run_only_fields,
)

JOBS = [
    cls
    for cls in vars(cfg).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__name__.endswith("Config")
]


def test_generate_identity_holds_the_checkpoint_sha_not_its_path():
    config = GenerateConfig(checkpoint="runs/00000", out="a", shard_range="0:2", snapshot="latest")
    job = identity(config, inputs={"checkpoint": "ab12"}, class_label=1, output_size=50)
    assert job["checkpoint"] == "ab12"
    assert job["class_label"] == 1 and job["output_size"] == 50
    assert not {"out", "shard_range", "snapshot"} & set(job)
    other = GenerateConfig(checkpoint="/elsewhere", out="b", shard_range="2:4")
    assert identity(other, inputs={"checkpoint": "ab12"}, class_label=1, output_size=50) == job


def test_an_input_field_without_its_sha_is_a_programming_error():
    with pytest.raises(TypeError, match="checkpoint"):
        identity(GenerateConfig(checkpoint="runs/00000", out="a"))


def test_differences_name_the_field_and_treat_json_lists_as_tuples():
    before = {"seed": 0, "shards": 4, "zoom": [1.0, 2.0]}
    now = {"seed": 1, "shards": 4, "zoom": (1.0, 2.0)}
    assert identity_differences(before, now) == ["seed 0 there, 1 now"]
    named = identity_differences({}, {"per_shard": 10}, lambda k: "--" + k.replace("_", "-"))
    assert named == ["--per-shard None there, 10 now"]


# The jobs that compare a rerun with the job already in their output folder.
COMPARED = ("Ingest", "Generate", "ImportSynthetic", "Classify", "Study", "Fidelity",
            "TrainSinGAN", "GenerateSinGAN")  # fmt: skip


@pytest.mark.parametrize("kind", JOBS, ids=lambda k: k.__name__)
def test_where_and_how_a_job_runs_is_never_its_identity(kind):
    names = [f.name for f in dataclasses.fields(kind)]
    if kind.__name__.removesuffix("Config") not in COMPARED:
        return
    # Where a job is, and how it runs, are never part of what it writes: a moved or renamed
    # output folder, another device or --force still hold the same job.
    for name in ("out", "outdir", "force", "device", "workers", "resume", "overwrite"):
        if name in names:
            assert name in run_only_fields(kind), f"{kind.__name__}.{name}"
