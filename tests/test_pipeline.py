"""`synthbreast pipeline --demo --budget tiny`: the whole chain through the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.eval.scenarios import scenario_names

# synthbreast/chain.py's stages, the jobs of `submit all` (tests/test_submit.py)
STAGES = [
    "demo-data", "ingest", "gan", "generate-class0", "generate-class1", "gate", "features",
    "classify", "fidelity-features", "fidelity", "report",
]  # fmt: skip


def run_pipeline(out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "synthbreast", "pipeline", "--demo", "--budget", "tiny",
         "--out", str(out), *extra],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_then_skips_them(tmp_path):
    out = tmp_path / "run"
    # a tiny GAN may well collapse: the gate would stop before classification (tested in
    # tests/test_gan_quality.py); here the chain goes on and the report must say so
    done = run_pipeline(out, "--keep-going")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out / "report" / "report.html"
    assert f"report: {report}" in done.stdout + done.stderr
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["stage"] for s in record["stages"]] == STAGES
    for name in scenario_names():
        metrics = json.loads((out / "classify" / name / "metrics.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert metrics["model"]["weights"] == "none"
    for label in (0, 1):
        manifest = json.loads((out / "synthetic" / f"class{label}" / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["job"]["output_size"] == 50
    fidelity = json.loads((out / "fidelity" / "fidelity.json").read_text())
    assert {"pixels", "histology"} <= set(fidelity["extractors"])
    assert "floor" in fidelity["extractors"]["histology"]
    text = (out / "report" / "report.md").read_text()
    assert all(name in text for name in scenario_names()) and "DEMO DATA" in text
    # the report shows the chain's own results: fidelity's (not "not run", its schema the
    # writer's), and the real-real of classify, not the histology space's real-real run
    assert "Fidelity was not run" not in text and "schema is not" not in text
    accuracy = json.loads((out / "classify" / "real-real" / "metrics.json").read_text())["accuracy"]
    row = next(line for line in text.splitlines() if line.startswith("| real-real |"))
    assert f"| {accuracy:.3f} [" in row
    # one conditional GAN drew both classes
    sources = {
        json.loads((out / "synthetic" / f"class{c}" / "manifest.json").read_text())["source"][
            "checkpoint_path"
        ]
        for c in (0, 1)
    }
    assert len(sources) == 1 and "msggan-cond" in sources.pop()
    gate = next(s for s in record["stages"] if s["stage"] == "gate")["status"]
    assert gate == "passed" or gate.startswith("collapsed, going on")
    assert ("GENERATOR COLLAPSED" in text) == (gate != "passed")

    # a second run finds every stage complete and redoes nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("classify/*/metrics.json")}
    again = run_pipeline(out, "--keep-going")
    assert again.returncode == 0, again.stderr[-3000:]
    stages = {s["stage"]: s for s in json.loads((out / "pipeline.json").read_text())["stages"]}
    assert stages["demo-data"]["status"] == stages["ingest"]["status"] == "skipped (complete)"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # `submit all` with the same options plans the same stages with the same configs: the
    # complete ones are left out (named in the script), every other job reads the very config
    # file the pipeline wrote (an identical file is reused, never rewritten)
    script = CliRunner().invoke(
        app, ["submit", "all", "--demo", "--budget", "tiny", "--out", str(out), "--keep-going",
              "--dry-run"],
    )  # fmt: skip
    assert script.exit_code == 0, script.output
    left_out = re.findall(r"^# ([\w-]+): complete, not submitted$", script.output, re.M)
    submitted = {}
    for line in script.output.splitlines():
        name = re.search(r"--job-name=synthbreast-([\w-]+)", line)
        path = re.search(r"(?:CONFIG=|--config )([^\s)]+)", line)
        if name:
            submitted[name[1]] = path[1]
    assert left_out == ["demo-data", "ingest"]
    assert left_out + list(submitted) == STAGES
    ran = {
        s["stage"]: s["config"] for s in json.loads((out / "pipeline.json").read_text())["stages"]
    }
    assert submitted == {name: ran[name] for name in submitted}
    assert "cat > " not in script.output  # nothing to write: the files are the pipeline's


def test_pipeline_needs_demo_or_data(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "synthbreast", "pipeline", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "--demo" in done.stderr + done.stdout
