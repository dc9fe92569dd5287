"""`synthbreast submit --dry-run`: the exact sbatch lines, in dependency order.

Real submissions against a local Slurm cluster are in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.eval.scenarios import scenario_names
from synthbreast.train.gan import BUDGETS


def dry_run(*args: str) -> str:
    result = CliRunner().invoke(app, ["submit", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return result.output


def written_configs(script: str) -> dict[str, dict]:
    """{path: config} of the files the dry-run script writes (quoted here-documents)."""
    found = re.findall(r"^cat > (\S+) <<'SYNTHBREAST_CONFIG'\n(.*?)\nSYNTHBREAST_CONFIG$", script,
                       re.M | re.S)  # fmt: skip
    return {path: json.loads(text) for path, text in found}


def job_configs(script: str) -> dict[str, dict]:
    """{job name: the config its sbatch line hands over (CONFIG=FILE or --config FILE)}."""
    files = written_configs(script)
    found = {}
    for line in script.splitlines():
        name = re.search(r"--job-name=synthbreast-([\w-]+)", line)
        path = re.search(r"(?:CONFIG=|--config )([^\s)]+)", line)
        if name and path:
            found[name[1]] = files[path[1]]
    return found


def test_submit_all_dry_run_is_a_valid_script_with_the_chain_in_order(tmp_path):
    script = dry_run("all", "--demo", "--out", str(tmp_path / "run"), "--budget", "tiny")
    path = tmp_path / "submit.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    jobs = re.findall(
        r"^(\w+)=\$\(.*?sbatch --parsable --job-name=synthbreast-([\w-]+)", script, re.M
    )
    names = [name for _, name in jobs]
    assert names == [
        "demo-data", "ingest", "gan", "generate-class0", "generate-class1",
        "gate", "features", "classify", "fidelity-features", "fidelity", "report",
    ]  # fmt: skip
    lines = {
        name: line
        for line in script.splitlines()
        for _, name in jobs
        if f"--job-name=synthbreast-{name} " in line
    }
    # each job waits for its parents, by the shell variables that hold their ids
    assert "--dependency=afterok:'\"$DEMO_DATA_JOB\"'" in lines["ingest"]
    assert "--dependency=afterok:'\"$GAN_JOB\"'" in lines["generate-class1"]
    assert "$GENERATE_CLASS0_JOB" in lines["gate"] and "$GENERATE_CLASS1_JOB" in lines["gate"]
    # the collapse gate stands between generation and classification, as in `pipeline`; the
    # feature pass (an array over blocks of shards, FEATURES_ONLY=1) fills the cache between
    assert "--dependency=afterok:'\"$GATE_JOB\"'" in lines["features"]
    assert "FEATURES_ONLY=1 " in lines["features"] and "--array=0-1 " in lines["features"]
    assert "slurm/classify.sh" in lines["features"] and "FEATURES_ONLY" not in lines["classify"]
    assert "--dependency=afterok:'\"$FEATURES_JOB\"'" in lines["classify"]
    assert "$GENERATE_CLASS0_JOB" not in lines["classify"]
    # fidelity needs the synthetic sets alone (it trains its own histology space), so it runs
    # beside the classifier array, after its own feature pass (an array of run.sh tasks, the
    # config saying features_only); the report waits for both
    fidelity_features = lines["fidelity-features"]
    assert "$GENERATE_CLASS0_JOB" in fidelity_features and "$GATE_JOB" not in fidelity_features
    assert "--array=0-1 " in fidelity_features and "slurm/run.sh fidelity" in fidelity_features
    assert job_configs(script)["fidelity-features"]["features_only"] is True
    assert "--dependency=afterok:'\"$FIDELITY_FEATURES_JOB\"'" in lines["fidelity"]
    assert "$CLASSIFY_JOB" not in lines["fidelity"]
    assert "--dependency=afterany:'\"$CLASSIFY_JOB\"':'\"$FIDELITY_JOB\"''" in lines["report"]
    assert f"--array=0-{len(scenario_names()) - 1}" in lines["classify"]
    assert "slurm/train_gan.sh" in lines["gan"]
    # the settings travel as each stage's config file, not as flags for bash
    configs = job_configs(script)
    assert set(configs) == set(names)
    assert "EXTRA=" not in script and all("CONFIG=" in lines[n] or "--config" in lines[n]
                                          for n in names)  # fmt: skip
    fidelity = configs["fidelity"]
    assert "histology" in fidelity["extractors"] and fidelity["classifier_run"] is None
    gan = configs["gan"]
    assert (gan["job"], gan["model"], gan["budget"], gan["class_label"]) == (
        "TrainGANConfig",
        "msggan-cond",
        "tiny",
        None,
    )
    assert gan["resolution"] == BUDGETS["tiny"]["resolution"] and gan["resume"] == "auto"
    assert configs["generate-class1"]["class_label"] == 1
    assert configs["generate-class1"]["output_size"] == 50  # the real patch size
    assert configs["classify"]["weights"] == "none" and configs["classify"]["task_id"] is None
    # the paper's one GAN per class, on request
    per_class = dry_run("all", "--demo", "--out", str(tmp_path / "r2"), "--budget", "tiny",
                        "--per-class-gans")  # fmt: skip
    assert "synthbreast-gan-class1 " in per_class
    assert job_configs(per_class)["gan-class1"]["class_label"] == 1


def test_submit_classify_dry_run_caps_the_array_and_reruns_one_task(tmp_path):
    common = ["--real", "r", "--synthetic", "s", "--out", str(tmp_path)]
    assert "--array=0-4%2" in dry_run("classify", *common, "--max-parallel", "2")
    one = dry_run("classify", *common, "--tasks", "3")
    # relative paths become absolute: the jobs and `status` must not depend on the cwd
    assert "--array=3 " in one
    assert job_configs(one)["classify"]["synthetic"] == [str(Path.cwd() / "s")]


def test_submit_report_waits_for_a_given_job(tmp_path):
    line = dry_run("report", "--runs", str(tmp_path), "--out", str(tmp_path / "r"), "--after", "42")
    assert "--dependency=afterany:42" in line and "slurm/report.sh" in line


def test_submit_all_needs_data_or_demo(tmp_path):
    result = CliRunner().invoke(app, ["submit", "all", "--out", str(tmp_path), "--dry-run"])
    assert result.exit_code == 2 and "--demo or --data" in result.output


def test_submit_all_again_leaves_out_the_complete_demo_data_and_ingest(tmp_path):
    """A second `submit all` into the same OUT continues the chain, as `pipeline` does: the
    stages complete at submission are left out (demo-data refuses an existing folder; a rerun
    ingest would rewrite the manifest that later results were computed from), and the later
    stages skip what is complete themselves."""
    from synthbreast.chain import PIPELINE_BUDGETS
    from synthbreast.config import DemoDataConfig, IngestConfig
    from synthbreast.data.demo import write_demo_dataset
    from synthbreast.data.ingest import run_ingest

    tiny, out = PIPELINE_BUDGETS["tiny"], tmp_path / "run"
    demo = DemoDataConfig(str(out / "data"), tiny.demo_patients, tiny.demo_per_class)
    write_demo_dataset(demo)
    script = dry_run("all", "--demo", "--out", str(out), "--budget", "tiny")
    assert "job-name=synthbreast-demo-data" not in script
    assert "# demo-data: complete, not submitted" in script
    ingest = next(line for line in script.splitlines() if "synthbreast-ingest" in line)
    assert "--dependency" not in ingest

    run_ingest(IngestConfig(src=demo.out, out=str(out / "shards"), small_patches="pad"))
    script = dry_run("all", "--demo", "--out", str(out), "--budget", "tiny")
    assert "synthbreast-ingest" not in script
    gan = next(line for line in script.splitlines() if "synthbreast-gan " in line)
    assert "--dependency" not in gan

    # demo data of another size there: refused before anything is submitted
    result = CliRunner().invoke(app, ["submit", "all", "--demo", "--out", str(out), "--dry-run"])
    assert result.exit_code == 2 and "another config" in result.output


# --- SinGAN: train-singan (task k = model k) and generate-singan (task k = a block of shards)


def test_submit_train_singan_is_one_array_of_models_with_its_config_file(tmp_path):
    shards, outdir = tmp_path / "shards", tmp_path / "singan"
    script = dry_run("train-singan", str(shards), "--class", "2", "--images", "8", "--outdir",
                     str(outdir), "--budget", "small", "--max-parallel", "4")  # fmt: skip
    path = tmp_path / "submit.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    (line,) = [line for line in script.splitlines() if "sbatch" in line]
    assert "--array=0-7%4" in line and "slurm/train_singan.sh" in line
    assert f"--output={outdir}/logs/%x-%A_%a.out" in line
    config = job_configs(script)["train-singan"]
    assert (config["job"], config["class_label"], config["images"]) == ("TrainSinGANConfig", 2, 8)
    assert config["task_id"] is None, "the array task adds its own --task-id"
    assert config["budget"] == "small" and config["max_size"] == 128
    assert config["shards"] == str(shards) and config["outdir"] == str(outdir)
    assert f"CONFIG={outdir}/configs/train-singan.json" in line and "EXTRA=" not in line
    assert not outdir.exists(), "a dry run writes nothing"
    # what train_singan.sh runs for array task 5: the file's job, model 5
    (file,) = written_configs(script)
    Path(file).parent.mkdir(parents=True)
    Path(file).write_text(json.dumps(config))
    task = CliRunner().invoke(app, ["train-singan", "--config", file, "--task-id", "5",
                                    "--dry-run"])  # fmt: skip
    assert task.exit_code == 0, task.output
    assert json.loads(task.output) == {**config, "task_id": 5}
    # --tasks reruns one model, with the file the array was submitted with
    one = dry_run("train-singan", "--config", file, "--tasks", "3")
    assert "--array=3 " in one and job_configs(one)["train-singan"] == config
    # relative paths become absolute: the jobs and `status` must not depend on the cwd
    relative = dry_run("train-singan", "s", "--class", "1", "--outdir", "o")
    assert job_configs(relative)["train-singan"]["outdir"] == str(Path.cwd() / "o")
    assert job_configs(relative)["train-singan"]["shards"] == str(Path.cwd() / "s")
    # bad options are refused before anything is written, as train-singan refuses them
    for args, message in [
        ([str(shards)], "--class is required"),
        ([str(shards), "--class", "1", "--images", "0"], "--images 0"),
        ([], "give SHARDS"),
    ]:
        result = CliRunner().invoke(app, ["submit", "train-singan", *args, "--dry-run"])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_submit_generate_singan_is_an_array_over_shards_after_the_training_job(tmp_path):
    models, out = tmp_path / "singan", tmp_path / "synthetic"
    script = dry_run("generate-singan", str(models), "--out", str(out), "--shards", "12",
                     "--per-shard", "100", "--num-models", "4", "--after", "42")  # fmt: skip
    (line,) = [line for line in script.splitlines() if "sbatch" in line]
    assert "--array=0-7 " in line and "slurm/generate_singan.sh" in line, "min(shards, 8) tasks"
    assert "--dependency=afterok:42" in line and "--kill-on-invalid-dep=yes" in line
    config = job_configs(script)["generate-singan"]
    assert config["job"] == "GenerateSinGANConfig" and config["num_models"] == 4
    assert (config["models"], config["out"], config["shard_range"]) == (str(models), str(out),
                                                                        None)  # fmt: skip
    # the config, logs and jobs.jsonl beside the models: generate-singan refuses an OUT that
    # holds anything but its shards
    assert f"CONFIG={models}/configs/generate-singan.json" in line
    assert f"--output={models}/logs/" in line and str(out / "logs") not in script
    few = dry_run("generate-singan", str(models), "--out", str(out), "--shards", "3")
    assert "--array=0-2 " in few and "--dependency" not in few
    bad = CliRunner().invoke(app, ["submit", "generate-singan", str(models), "--out", str(out),
                                   "--per-shard", "0", "--dry-run"])  # fmt: skip
    assert bad.exit_code == 2 and "--per-shard 0" in bad.output


def test_generate_singan_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", "slurm/generate_singan.sh"]).returncode == 0
