"""synthbreast/chain.py: `pipeline` and `submit all` from one plan, through the real CLI.

The slow end-to-end runs are in tests/test_pipeline.py (the tiny pipeline, then `submit all
--dry-run` on its OUT reuses every config file it wrote) and tests/test_slurm_chain.py (the
chain under a real Slurm).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from synthbreast.chain import plan
from synthbreast.cli import app
from synthbreast.config import PipelineConfig, load_config, to_dict
from synthbreast.eval.scenarios import scenario_names

TINY = ["--demo", "--budget", "tiny"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def pipeline_plan(*args: str) -> tuple[PipelineConfig, list[tuple[str, str, list[str]]]]:
    """`pipeline ... --dry-run`: its config, and its stages as (name, command, parents)."""
    text = ok("pipeline", *args, "--dry-run")
    config, _, rest = text.partition("\n}\n")
    stages = []
    for line in rest.splitlines():
        found = re.fullmatch(
            r"([\w-]+): synthbreast ([\w-]+) --config FILE(?: \(after (.*)\))?", line
        )
        assert found, line
        stages.append((found[1], found[2], found[3].split(", ") if found[3] else []))
    data = json.loads(config + "\n}")
    return PipelineConfig(**{k: v for k, v in data.items() if k != "job"}), stages


def submitted(script: str) -> tuple[list[tuple[str, str, list[str]]], dict[str, dict]]:
    """`submit all --dry-run`: its jobs as (name, command, parents) and {name: config}."""
    files = dict(
        re.findall(r"^cat > (\S+) <<'SYNTHBREAST_CONFIG'\n(.*?)\nSYNTHBREAST_CONFIG$", script,
                   re.M | re.S)
    )  # fmt: skip
    variables = {}
    jobs, configs = [], {}
    for line in script.splitlines():
        found = re.match(r"^(\w+)=\$\(.*--job-name=synthbreast-([\w-]+)", line)
        if not found:
            continue
        variable, name = found[1], found[2]
        variables[variable] = name
        path = re.search(r"(?:CONFIG=|--config )([^\s)]+)", line)[1]
        configs[name] = json.loads(files[path])
        parents = re.findall(r"\"\$(\w+)\"", line)
        command = {"train_gan.sh": "train-gan", "generate.sh": "generate",
                   "classify.sh": "classify", "report.sh": "report"}  # fmt: skip
        script_name = re.search(r"slurm/([\w.]+)", line)[1]
        kind = command.get(script_name) or re.search(r"run\.sh ([\w-]+)", line)[1]
        jobs.append((name, kind, [variables[p] for p in parents]))
    return jobs, configs


def write_files(script: str) -> None:
    for path, text in re.findall(
        r"^cat > (\S+) <<'SYNTHBREAST_CONFIG'\n(.*?)\nSYNTHBREAST_CONFIG$", script, re.M | re.S
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def test_pipeline_and_submit_all_take_the_same_options_with_the_same_defaults():
    commands = typer.main.get_command(app).commands
    pipeline = {p.name: p.default for p in commands["pipeline"].params if p.name != "dry_run"}
    submit_all = {p.name: p.default for p in commands["submit"].commands["all"].params}
    slurm_only = {"max_parallel", "sbatch_args", "dry_run"}
    assert {k: v for k, v in submit_all.items() if k not in slurm_only} == pipeline
    assert pipeline["budget"] == "small" and "config_file" in pipeline


@pytest.mark.parametrize("extra", [[], ["--per-class-gans"]])
def test_submit_all_submits_the_stages_pipeline_runs_with_the_same_configs(tmp_path, extra):
    args = [*TINY, "--out", tmp_path / "run", *extra]
    config, stages = pipeline_plan(*args)
    jobs, configs = submitted(ok("submit", "all", *args, "--dry-run"))
    assert jobs == stages  # names, commands and parents, in the same order
    names = [name for name, _, _ in stages]
    generation = ["gan", "generate-class0", "generate-class1"]
    if extra:  # each class's GAN, then its generation
        generation = ["gan-class0", "generate-class0", "gan-class1", "generate-class1"]
    assert names == [
        "demo-data", "ingest", *generation, "gate", "features", "classify", "fidelity-features",
        "fidelity", "report",
    ]  # fmt: skip
    # and the config each job reads is the one the pipeline runs that stage with
    assert configs == {stage.name: to_dict(stage.config) for stage in plan(config)}


def test_every_option_of_pipeline_reaches_the_submitted_stages(tmp_path):
    weights = tmp_path / "resnet50.pth"
    args = [*TINY, "--out", tmp_path / "run", "--seed", "5", "--skip-bad", "--workers", "1",
            "--keep-going", "--backbone", "resnet50", "--weights", "imagenet",
            "--weights-path", weights]  # fmt: skip
    config, stages = pipeline_plan(*args)
    jobs, configs = submitted(ok("submit", "all", *args, "--dry-run"))
    assert jobs == stages
    assert configs == {stage.name: to_dict(stage.config) for stage in plan(config)}
    seeded = ["demo-data", "ingest", "gan", "generate-class0", "classify", "fidelity"]
    assert {name: configs[name]["seed"] for name in seeded} == dict.fromkeys(seeded, 5)
    assert configs["ingest"]["skip_bad"] and configs["ingest"]["workers"] == 1
    assert configs["gate"]["keep_going"]
    classify = configs["classify"]
    assert (classify["backbone"], classify["weights"], classify["weights_path"]) == (
        "resnet50",
        "imagenet",
        str(weights),
    )
    # the budget's values, not ones the submission made up
    assert classify["epochs"] == 3 and configs["generate-class0"]["shards"] == 2


def test_classes_come_from_the_data_not_a_fixed_list(tmp_path):
    """An imagefolder of three classes: three generation stages in both, each its class."""
    src = tmp_path / "images"
    for name in ("benign", "in-situ", "invasive"):
        (src / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 100, 150)).save(src / name / "a.png")
    args = ["--data", src, "--format", "imagefolder", "--budget", "tiny", "--out", tmp_path / "r"]
    config, stages = pipeline_plan(*args)
    jobs, configs = submitted(ok("submit", "all", *args, "--dry-run"))
    assert jobs == stages
    assert configs == {stage.name: to_dict(stage.config) for stage in plan(config)}
    generated = [name for name, command, _ in jobs if command == "generate"]
    assert generated == ["generate-class0", "generate-class1", "generate-class2"]
    assert [configs[n]["class_label"] for n in generated] == [0, 1, 2]
    assert configs["gate"]["synthetic"] == [configs[n]["out"] for n in generated]


def test_every_stage_command_reads_its_config_file_and_options_override_it(tmp_path):
    script = ok("submit", "all", *TINY, "--out", tmp_path / "run", "--dry-run")
    write_files(script)
    jobs, configs = submitted(script)
    files = dict(re.findall(r"--job-name=synthbreast-([\w-]+).*?(?:--config )([^\s)]+)", script))
    files.update(
        {n: p for p, n in re.findall(r"CONFIG=(\S+) sbatch .*?--job-name=synthbreast-([\w-]+)",
                                     script)}
    )  # fmt: skip
    (tmp_path / "run" / "data").mkdir()  # ingest checks its SRC even for --dry-run
    for name, command, _ in jobs:
        # a scenario array task adds its index, as slurm/classify.sh does
        task = {"task_id": 0} if command == "classify" else {}
        args = ["--task-id", "0"] if task else []
        shown = ok(command, "--config", files[name], *args, "--dry-run")
        assert json.loads(shown[: shown.index("\n}\n") + 2]) == {**configs[name], **task}, name
    # an option given on the command line overrides the file's value, and only that one
    shown = ok("classify", "--config", files["classify"], "--epochs", "7", "--task-id", "1",
               "--dry-run")  # fmt: skip
    assert json.loads(shown) == {**configs["classify"], "epochs": 7, "task_id": 1}
    task = json.loads(ok("classify", "--config", files["classify"], "--task-id", "3", "--dry-run"))
    assert task["task_id"] == 3 and scenario_names()[3] == "synth-real"
    # refused with a one-line reason: --budget over a file (it holds the budget's values),
    # a file of another job, a missing file, no file and no required argument
    for args, message in [
        (["train-gan", "--config", files["gan"], "--budget", "small"], "--budget with --config"),
        (["classify", "--config", files["gan"], "--dry-run"], "holds a TrainGANConfig config"),
        (["generate", "--config", tmp_path / "nope.json"], "cannot read it"),
        (["ingest", "--dry-run"], "give SRC and OUT, or the whole job as --config FILE"),
    ]:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_config_file_with_a_field_the_job_lacks_is_named(tmp_path):
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"job": "GateConfig", "synthetic": [], "keep_goin": True}))
    result = invoke("gate", "--config", path)
    assert result.exit_code == 2 and "unknown field(s) keep_goin for GateConfig" in result.output


def test_status_asks_every_stage_of_the_chain_for_its_outputs(tmp_path):
    """No job submitted yet: the chain's config (written by the script) is enough."""
    out = tmp_path / "run"
    write_files(ok("submit", "all", *TINY, "--out", out, "--dry-run"))
    assert load_config(out / "config.json", PipelineConfig).budget == "tiny"
    shown = ok("status", out)
    rows = dict(re.findall(r"│ (\S+) +│ (.+?) +│", shown))
    expected = ["data", "shards", "gan/all", "synthetic/class0", "synthetic/class1",
                "classify/features", *(f"classify/{s}" for s in scenario_names()), "fidelity",
                "report"]  # fmt: skip
    assert {name: rows[name] for name in expected} == dict.fromkeys(expected, "missing")
    assert rows["synthetic/gate"] == "waiting for generate"
