"""Ingest on the real IDC sample (../shared/real-sample/idc): its real quirks. Skips if absent."""

from __future__ import annotations

import pytest

from synthbreast.config import IngestConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.shards import load_manifest, verify_shards
from synthbreast.errors import UserError


def test_border_patches_stop_the_default_ingest(real_sample, tmp_path):
    with pytest.raises(UserError) as err:
        run_ingest(IngestConfig(src=str(real_sample), out=str(tmp_path / "out")))
    message = str(err.value)
    assert "7 patch(es) smaller than 50x50" in message
    assert "9076_idx5_x1051_y2901_class0.png" in message


def test_real_sample_ingests_with_padding(real_sample, tmp_path):
    manifest = run_ingest(
        IngestConfig(src=str(real_sample), out=str(tmp_path / "out"), small_patches="pad")
    )
    assert manifest["source"]["real"] is True and manifest["source"]["demo"] is False
    totals = {"0": 0, "1": 0}
    for info in manifest["pools"].values():
        for label, count in info["counts"].items():
            totals[label] += count
    assert totals == {"0": 1659, "1": 485}
    assert manifest["small_patches"]["count"] == 7
    patients = [set(info["patients"]) for info in manifest["pools"].values()]
    assert sum(len(p) for p in patients) == len(set().union(*patients)) == 40
    # patients with class 0 only still land in exactly one pool
    assert sum("9175" in p for p in patients) == 1
    assert verify_shards(tmp_path / "out", load_manifest(tmp_path / "out")) == []


def test_real_sample_drop_policy(real_sample, tmp_path):
    manifest = run_ingest(
        IngestConfig(src=str(real_sample), out=str(tmp_path / "out"), small_patches="drop")
    )
    assert manifest["totals"]["images"] == 2144 - 7
    assert manifest["dropped"]["small"] == 7
