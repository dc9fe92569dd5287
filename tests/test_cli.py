"""The CLI end to end: demo-data -> ingest -> inspect, help texts, bad flags, tampering."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.data.shards import load_manifest

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["demo-data", "ingest", "inspect"])
def test_help_explains_each_command(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_demo_ingest_inspect(tmp_path):
    demo, shards = tmp_path / "d", tmp_path / "s"
    result = invoke("demo-data", demo, "--patients", "6", "--per-class", "10")
    assert result.exit_code == 0, result.output
    assert "not real" in result.output
    result = invoke("ingest", demo, shards)
    assert result.exit_code == 0, result.output
    assert load_manifest(shards)["totals"]["images"] == 120
    result = invoke("inspect", shards)
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "DEMO DATA" in result.output
    for label in ("0", "1"):
        assert (shards / "inspect" / f"grid-class{label}.png").stat().st_size > 1000


def test_inspect_fails_on_a_damaged_shard(demo_shards, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in demo_shards.glob("*"):
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    victim = copy / load_manifest(copy)["shards"][2]["name"]
    victim.write_bytes(victim.read_bytes()[:-1024])
    (copy / "stray-000000.tar").write_bytes(b"")
    result = invoke("inspect", copy)
    assert result.exit_code == 2
    assert victim.name in result.output and "stray-000000.tar" in result.output


def test_dry_run_prints_the_config(tmp_path):
    result = invoke("ingest", tmp_path, tmp_path / "out", "--dry-run", "--seed", "5")
    assert result.exit_code == 0
    config = json.loads(result.output)
    assert config["job"] == "IngestConfig" and config["seed"] == 5
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--small-patches", "shrink"], "shrink"),
        (["--gan-fraction", "1.5"], "--gan-fraction"),
        (["--test-fraction", "0"], "--test-fraction"),
        (["--format", "dicom"], "dicom"),
        (["--overwrite", "--resume"], "contradict"),
    ],
)
def test_bad_flags_are_refused_clearly(demo_dir, tmp_path, flags, words):
    result = invoke("ingest", demo_dir, tmp_path / "out", *flags)
    assert result.exit_code == 2
    assert words in result.output
    assert not (tmp_path / "out").exists()


def test_inspect_of_a_folder_that_is_not_shards(tmp_path):
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 2
    assert "synthbreast ingest" in result.output
