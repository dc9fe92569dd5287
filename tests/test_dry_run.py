"""`--dry-run` of every stage checks the options as the run does before it makes any folder
(the same one-line error), then prints the config; it never creates OUT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthbreast.cli import app

runner = CliRunner()


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Input folders that exist (dry runs do not read them) and an OUT that must not appear."""
    names = ("src", "shards", "run", "images", "runs", "real", "synthetic")
    found = {name: tmp_path / name for name in names}
    for path in found.values():
        path.mkdir()
    found["out"] = tmp_path / "out"
    return found


# (the stage's arguments with {name} for a folder of `inputs`, the option made bad, its value,
# words of the error)
STAGES = {
    "ingest": ["ingest", "{src}", "{out}"],
    "train-gan": ["train-gan", "{shards}", "--outdir", "{out}"],
    "generate": ["generate", "--checkpoint", "{run}", "--out", "{out}", "--shards", "3"],
    "import-synthetic": ["import-synthetic", "{images}", "--out", "{out}"],
    "report": ["report", "{runs}", "--out", "{out}"],
    "classify": ["classify", "--out", "{out}", "--scenario", "real-real"],
    "fidelity": ["fidelity", "--real", "{real}", "--synthetic", "{synthetic}", "--out", "{out}",
                 "--extractor", "pixels"],
}  # fmt: skip
BAD = [
    ("ingest", ["--shard-size", "0"], "--shard-size"),
    ("ingest", ["--gan-fraction", "1.5"], "--gan-fraction"),
    ("ingest", ["--workers", "0"], "--workers"),
    ("train-gan", ["--batch-size", "0"], "--batch-size 0"),
    ("train-gan", ["--resolution", "48"], "--resolution 48"),
    ("train-gan", ["--workers", "-1"], "--workers -1"),
    ("train-gan", ["--kimg", "0"], "--kimg 0"),
    ("train-gan", ["--lr", "nan"], "--lr nan"),
    ("generate", ["--per-shard", "0"], "--per-shard"),
    ("generate", ["--shard-range", "2:9"], "--shard-range '2:9' goes past the job's 3 shards"),
    ("generate", ["--output-size", "0"], "--output-size"),
    ("import-synthetic", ["--shard-size", "0"], "--shard-size"),
    ("report", ["--grid-per-class", "0"], "--grid-per-class 0"),
    ("classify", ["--epochs", "0"], "--epochs"),
    ("classify", ["--lr", "nan"], "--lr nan"),
    ("classify", ["--synth-ratio", "-1"], "--synth-ratio -1"),
    ("classify", ["--task-id", "1"], "disagree"),
    ("classify", ["--input-size", "8"], "--input-size 8"),
    ("fidelity", ["--nearest-k", "0"], "--nearest-k"),
    ("fidelity", ["--workers", "-1"], "--workers"),
    ("fidelity", ["--floor-pool", "test"], "--floor-pool test"),
    ("fidelity", ["--extractor", "nope"], "--extractor 'nope' unknown"),
    ("fidelity", ["--sifid-space", "nope"], "--sifid-space 'nope' unknown"),
    ("fidelity", ["--sifid-variants", "0"], "--sifid-variants must be at least 1"),
]


def stage_args(stage: str, inputs: dict[str, Path]) -> list[str]:
    return [arg.format(**inputs) for arg in STAGES[stage]]


@pytest.mark.parametrize("stage", list(STAGES))
def test_dry_run_prints_the_config_and_makes_no_folder(stage, inputs):
    result = runner.invoke(app, [*stage_args(stage, inputs), "--dry-run"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    assert config["job"].endswith("Config")
    assert not inputs["out"].exists(), f"{stage} --dry-run made {inputs['out']}"
    assert not any(any(p.iterdir()) for n, p in inputs.items() if n != "out"), "inputs written"


@pytest.mark.parametrize("stage, bad, words", BAD, ids=[f"{s}{b[0]}" for s, b, _ in BAD])
def test_dry_run_refuses_a_bad_option_as_the_run_does(stage, bad, words, inputs):
    args = [*stage_args(stage, inputs), *bad]
    for dry in (["--dry-run"], []):  # the same one line, with and without --dry-run
        result = runner.invoke(app, [*args, *dry])
        assert result.exit_code == 2, (dry, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (dry, result.output)
        assert words in lines[0], (dry, lines[0])
        assert not inputs["out"].exists(), f"{stage} {' '.join(bad)} {dry} made OUT"
