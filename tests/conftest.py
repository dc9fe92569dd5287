"""Shared fixtures: a small demo dataset and its shards, made once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from synthbreast.config import DemoDataConfig, IngestConfig
from synthbreast.data.demo import write_demo_dataset
from synthbreast.data.ingest import run_ingest
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (a local Slurm cluster)

REPO = Path(__file__).resolve().parents[1]
# ../shared/real-sample beside the repository (a checkout of the team's workspace), or a path
REAL_SAMPLE = Path(
    os.environ.get("SYNTHBREAST_REAL_SAMPLE", REPO.parent / "shared" / "real-sample" / "idc")
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest` runs two xdist workers on the 2-core machine (`--dist loadfile`: a module's tests
    # in one worker, so its module fixtures are made once; each worker that runs Slurm tests
    # starts its own cluster, with free ports and its own root): one thread each, and in every
    # process a test starts, not two threads each fighting for the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# 12 patients x 2 classes x 20 patches = 480 demo patches: enough for three pools.
DEMO_PATIENTS, DEMO_PER_CLASS = 12, 20


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "idc"
    write_demo_dataset(DemoDataConfig(str(out), DEMO_PATIENTS, DEMO_PER_CLASS, seed=0))
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    run_ingest(IngestConfig(src=str(demo_dir), out=str(out), shard_size=40, min_shards=4))
    return out


@pytest.fixture
def demo_copy(demo_dir, tmp_path) -> Path:
    """A private copy of the demo data that a test may damage."""
    copy = tmp_path / "src"
    shutil.copytree(demo_dir, copy)
    return copy


@pytest.fixture
def real_sample() -> Path:
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real IDC sample not found at {REAL_SAMPLE} (set SYNTHBREAST_REAL_SAMPLE)")
    return REAL_SAMPLE
