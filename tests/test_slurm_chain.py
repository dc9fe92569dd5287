"""The whole chain as Slurm jobs: `synthbreast submit all`, `status`, a failed scenario task and
its rerun, on the one-node local cluster of tests/slurm_cluster.py.

The scripts' #SBATCH lines ask for GPUs, 8-16 CPUs and 32 GB; `--sbatch-args` overrides them
for every job of the chain (a CPU-only node with 2 cores), as slurm/README.md tells a user to.
One tiny chain (module fixture) serves both tests: the first checks the chain itself, the second
reuses its real shards, GANs and cached features for a scenario array of its own.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from synthbreast.eval.scenarios import scenario_names

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU_ONLY = "--gpus-per-node=0 --gres=none --cpus-per-task=1 --mem=2G"
# the stages of synthbreast/chain.py, as `pipeline` runs them (tests/test_pipeline.py)
CHAIN = [
    "demo-data", "ingest", "gan", "generate-class0", "generate-class1",
    "gate", "features", "classify", "fidelity-features", "fidelity", "report",
]  # fmt: skip
# each job's parents, by name
PARENTS = {
    "demo-data": [], "ingest": ["demo-data"], "gan": ["ingest"],
    "generate-class0": ["gan"], "generate-class1": ["gan"],
    "gate": ["generate-class0", "generate-class1"], "features": ["gate"],
    "classify": ["features"],
    "fidelity-features": ["generate-class0", "generate-class1"],
    "fidelity": ["fidelity-features"], "report": ["classify", "fidelity"],
}  # fmt: skip
CHAIN_TIMEOUT = 600  # seconds for the whole tiny chain (about 3 minutes on 2 busy cores)


def synthbreast(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it on the login node: the cluster's environment, a wide terminal
    (rich tables do not wrap)."""
    return subprocess.run(
        [sys.executable, "-m", "synthbreast", *args],
        capture_output=True,
        text=True,
        env={**cluster.env, "COLUMNS": "300"},
        timeout=timeout,
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def submitted_id(stdout: str, name: str) -> str:
    found = re.search(rf"^{re.escape(name)}: job (\d+)$", stdout, re.M)
    assert found, stdout
    return found[1]


def logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(folder.glob("*.out")))


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def array_tasks(spec: str) -> list[int]:
    """'0-4' / '0-4%2' / '1,3' -> task ids."""
    tasks = []
    for part in spec.split("%")[0].split(","):
        first, _, last = part.partition("-")
        tasks += range(int(first), int(last or first) + 1)
    return tasks


def task_states(records: list[dict[str, str]]) -> dict[int, tuple[str, str]]:
    return {int(r["ArrayTaskId"]): (r["JobState"], r["ExitCode"]) for r in records}


@dataclass
class Chain:
    out: Path
    jobs: list[dict]  # OUT/jobs.jsonl
    records: dict[str, list[dict[str, str]]]  # job name -> scontrol records (one per task)
    seconds: float


@pytest.fixture(scope="module")
def chain(slurm_cluster, tmp_path_factory) -> Chain:
    """`synthbreast submit all --demo --budget tiny` into a fresh OUT, waited for to the end.
    OUT has a space and quotes in its name: every job gets its settings as a config file, and
    slurm/*.sh pass each path as one argument, never through a shell's parsing."""
    cluster = slurm_cluster
    out = tmp_path_factory.mktemp("chain") / "run 'it's'"
    started = time.monotonic()
    args = ["submit", "all", "--demo", "--out", str(out), "--budget", "tiny", "--keep-going"]
    ok(synthbreast(cluster, *args, "--sbatch-args", CPU_ONLY))
    jobs = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    deadline = started + CHAIN_TIMEOUT
    records = {}
    for job in jobs:
        try:
            records[job["name"]] = cluster.wait(job["job_id"], deadline - time.monotonic())
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{logs(out / 'logs')}") from None
    return Chain(out, jobs, records, time.monotonic() - started)


def test_submit_all_runs_every_job_after_its_parents_and_reports_every_scenario(
    chain, slurm_cluster
):
    cluster, out = slurm_cluster, chain.out
    print(f"tiny chain under Slurm: {chain.seconds:.0f} s")
    assert [job["name"] for job in chain.jobs] == CHAIN

    # every job, and every task of the arrays, completed
    for job in chain.jobs:
        records = chain.records[job["name"]]
        if job["array"]:
            states = task_states(records)
            assert sorted(states) == array_tasks(job["array"]), (job["name"], records)
            bad = {t: s for t, s in states.items() if s != ("COMPLETED", "0:0")}
        else:
            (record,) = records
            bad = {} if (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0") else record
        assert not bad, f"{job['name']}: {bad}\n{logs(out / 'logs')}"

    # the feature array's tasks embedded disjoint blocks that make up every scenario's shards,
    # so that no scenario task embedded any shard again
    ids = {job["name"]: job["job_id"] for job in chain.jobs}
    blocks = []
    for path in sorted((out / "logs").glob(f"synthbreast-features-{ids['features']}_*.out")):
        found = re.search(
            r"features \(array task \d+, one process\): (\d+) of (\d+) shards", path.read_text()
        )
        assert found, path.read_text()[-2000:]
        blocks.append((int(found[1]), int(found[2])))
    assert len(blocks) == 2 and sum(b for b, _ in blocks) == blocks[0][1] == blocks[1][1]
    assert all(b > 0 for b, _ in blocks), blocks
    for path in (out / "logs").glob(f"synthbreast-classify-{ids['classify']}_*.out"):
        computed = re.findall(
            r"features: \d+ shards cached in .*, (\d+) to compute", path.read_text()
        )
        assert computed and set(computed) == {"0"}, path.read_text()[-2000:]
    # and fidelity's feature array the same, in (shard, extractor) items
    blocks = []
    logs_of = f"synthbreast-fidelity-features-{ids['fidelity-features']}_*.out"
    for path in sorted((out / "logs").glob(logs_of)):
        found = re.search(
            r"fidelity features \(array task \d+, one process\): (\d+) of (\d+) \(shard",
            path.read_text(),
        )
        assert found, path.read_text()[-2000:]
        blocks.append((int(found[1]), int(found[2])))
    assert len(blocks) == 2 and sum(b for b, _ in blocks) == blocks[0][1] == blocks[1][1]
    assert all(b > 0 for b, _ in blocks), blocks

    # jobs.jsonl names each job's parents by id; no job (task) started before every parent
    # (task) had ended
    for job in chain.jobs:
        expected = [
            f"{ids[name]}_{task}" if task else ids[name]
            for parent in PARENTS[job["name"]]
            for name, _, task in [parent.partition("_")]
        ]
        assert job["after"] == expected, job
        started = min(when(r["StartTime"]) for r in chain.records[job["name"]])
        for parent in job["after"]:
            ended = max(when(r["EndTime"]) for r in cluster.jobs(parent))
            assert started >= ended, f"{job['name']} started {started}, before {parent} ended"

    # the report lists every scenario as ok, and the fidelity the chain measured
    with open(out / "report" / "metrics.csv", newline="") as f:
        rows = {row["scenario"]: row for row in csv.DictReader(f)}
    assert {name: rows[name]["status"] for name in scenario_names()} == dict.fromkeys(
        scenario_names(), "ok"
    )
    text = (out / "report" / "report.md").read_text()
    assert all(name in text for name in scenario_names())
    fidelity = json.loads((out / "fidelity" / "fidelity.json").read_text())
    assert {"pixels", "histology"} <= set(fidelity["extractors"])

    # status: every job and task COMPLETED, every output complete, nothing to rerun
    shown = ok(synthbreast(cluster, "status", str(out)))
    for job in chain.jobs:
        tasks = array_tasks(job["array"]) if job["array"] else []
        keys = [f"{job['job_id']}_{t}" for t in tasks] or [job["job_id"]]
        assert ", ".join(f"{k}:COMPLETED" for k in keys) in shown, (job["name"], shown)
    outputs = ["data", "shards", "gan/all", "synthetic/class0", "synthetic/class1", "fidelity",
               "report"]  # fmt: skip
    for name in outputs + [f"classify/{s}" for s in scenario_names()]:
        assert re.search(rf"│ {re.escape(name)} +│ complete +│", shown), (name, shown)
    assert re.search(r"│ classify/features +│ \d+ shards cached +│", shown), shown
    assert re.search(r"│ fidelity/features +│ \d+ shards cached +│", shown), shown
    # the gate passed the sets on (a tiny GAN may collapse: --keep-going, as the pipeline test)
    assert re.search(r"│ synthetic/gate +│ (passed|collapsed, going on)", shown), shown
    assert "FAILED" not in shown and "rerun" not in shown
    # every job ran `synthbreast <command> --config FILE`, FILE the stage's config
    for job in chain.jobs:
        config = json.loads(Path(job["config"]).read_text())
        assert Path(job["config"]).parent == out / "configs", job
        env = {
            "CONFIG": job["config"],
            **({"FEATURES_ONLY": "1"} if job["name"] == "features" else {}),
        }
        assert job["stage"] in job["command"] or job["env"] == env, job
        assert str(out) in json.dumps(config), job


def test_a_failed_scenario_task_is_reported_then_rerun_alone(chain, slurm_cluster, tmp_path):
    """A first look at the chain's generators: the scenario array on a synthetic set of ONE
    image per class (`generate --shards 1 --per-shard 1`), beside the chain's real shards.

    Four scenarios can run on two synthetic images (train or test on them next to real ones).
    synth-synth cannot: it splits the synthetic set 70/30 by a seeded hash and needs both
    classes in the training part and some images in the test part, which two images never give
    (whatever their hashes). So its task, and only it, fails for real, with failed.json; the
    report (afterany) still runs and lists it as failed. The fix is a synthetic set big enough
    to split (here the chain's own: 2 shards x 40 images per class); then the command that
    `synthbreast status` prints reruns task 1 alone, and a new report is complete.
    """
    cluster = slurm_cluster
    run = tmp_path / "run"
    shutil.copytree(chain.out / "shards", run / "shards")
    # the real shards' backbone features, cached by shard sha256, as the chain computed them
    shutil.copytree(chain.out / "classify" / "features", run / "classify" / "features")
    generating = []
    for c in (0, 1):
        args = ["generate", "--checkpoint", str(chain.out / "gan" / "all"), "--class", str(c)]
        args += ["--out", str(run / "synthetic" / f"class{c}"), "--shards", "1", "--per-shard", "1"]
        command = [sys.executable, "-m", "synthbreast", *args, "--output-size", "50"]
        generating.append(
            subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=cluster.env,
            )
        )
    for process in generating:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]

    # the scenario array with the chain's classify config (its folders overridden), and the
    # report after it
    (classify_job,) = [job for job in chain.jobs if job["name"] == "classify"]
    common = ["--real", str(run / "shards"), "--synthetic", str(run / "synthetic")]
    common += ["--out", str(run / "classify"), "--config", classify_job["config"]]
    submitted = ok(synthbreast(cluster, "submit", "classify", *common, "--sbatch-args", CPU_ONLY))
    array = submitted_id(submitted, "classify")
    report = ["submit", "report", "--runs", str(run), "--out", str(run / "report")]
    report_id = submitted_id(
        ok(synthbreast(cluster, *report, "--after", array, "--sbatch-args", CPU_ONLY)), "report"
    )
    states = task_states(cluster.wait(array, timeout=300))
    failing = scenario_names().index("synth-synth")
    scenario_logs = logs(run / "classify" / "logs")
    assert states[failing][0] == "FAILED", f"{states}\n{scenario_logs}"
    assert {t: s for t, s in states.items() if t != failing} == {
        t: ("COMPLETED", "0:0") for t in range(len(scenario_names())) if t != failing
    }, f"{states}\n{scenario_logs}"
    failed = json.loads((run / "classify" / "synth-synth" / "failed.json").read_text())
    assert (failed["scenario"], failed["task_id"]) == ("synth-synth", failing)
    assert failed["error"].startswith("UserError:"), failed

    # the report ran all the same, and lists it as failed
    (record,) = cluster.wait(report_id, timeout=120)
    assert record["JobState"] == "COMPLETED", f"{record}\n{logs(run / 'logs')}"
    with open(run / "report" / "metrics.csv", newline="") as f:
        rows = {row["scenario"]: row["status"] for row in csv.DictReader(f)}
    assert rows == {name: "failed" if name == "synth-synth" else "ok" for name in scenario_names()}
    assert re.search(r"synth-synth.*failed", (run / "report" / "report.md").read_text())

    # status shows the failed task, the failed output and the command that reruns it alone
    shown = ok(synthbreast(cluster, "status", str(run)))
    assert f"{array}_{failing}:FAILED" in shown, shown
    assert re.search(r"│ classify/synth-synth +│ failed: UserError", shown), shown
    assert re.search(r"│ classify/real-real +│ complete", shown), shown
    (rerun,) = [line for line in shown.splitlines() if line.startswith("synthbreast submit")]
    assert f"--tasks {failing} " in rerun and f"--sbatch-args '{CPU_ONLY}'" in rerun, rerun

    # fix the cause, rerun exactly that command: only task 1 runs, the others stay as they are
    for c in (0, 1):
        shutil.rmtree(run / "synthetic" / f"class{c}")
        shutil.copytree(chain.out / "synthetic" / f"class{c}", run / "synthetic" / f"class{c}")
    results = {p: p.stat().st_mtime_ns for p in (run / "classify").glob("*/metrics.json")}
    again = submitted_id(ok(synthbreast(cluster, *shlex.split(rerun)[1:])), "classify")
    report_id = submitted_id(
        ok(synthbreast(cluster, *report, "--after", again, "--sbatch-args", CPU_ONLY)), "report"
    )
    assert task_states(cluster.wait(again, timeout=300)) == {failing: ("COMPLETED", "0:0")}, logs(
        run / "classify" / "logs"
    )
    assert {p: p.stat().st_mtime_ns for p in results} == results
    assert (run / "classify" / "synth-synth" / "metrics.json").is_file()
    assert not (run / "classify" / "synth-synth" / "failed.json").exists()

    # the new report is complete; status shows the rerun task done and nothing left to rerun
    (record,) = cluster.wait(report_id, timeout=120)
    assert record["JobState"] == "COMPLETED", f"{record}\n{logs(run / 'logs')}"
    with open(run / "report" / "metrics.csv", newline="") as f:
        rows = {row["scenario"]: row["status"] for row in csv.DictReader(f)}
    assert rows == dict.fromkeys(scenario_names(), "ok")
    shown = ok(synthbreast(cluster, "status", str(run)))
    assert f"{again}_{failing}:COMPLETED" in shown, shown
    assert re.search(r"│ classify/synth-synth +│ complete", shown), shown
    assert "synthbreast submit" not in shown, shown


def test_train_gan_sh_passes_paths_and_extra_flags_as_words_never_as_shell_code(
    slurm_cluster, demo_shards, tmp_path
):
    """slurm/train_gan.sh by hand (SHARDS, OUTDIR, EXTRA): an OUTDIR with quotes and a space
    trains into that very folder; an EXTRA with `;` in it is words for train-gan, which refuses
    them, and runs nothing (it once went into a `bash -c "..."` string)."""
    cluster = slurm_cluster
    script = str(Path(__file__).resolve().parents[1] / "slurm" / "train_gan.sh")
    outdir = tmp_path / "gan 'q' \"x\""
    mark = tmp_path / "ran"
    flags = "--budget tiny --kimg 0.016 --metric-images 0 --workers 0"
    jobs = {}
    for name, extra in (("quoted", flags), ("injected", f"{flags} ; touch {mark}")):
        env = {"SHARDS": str(demo_shards), "OUTDIR": str(outdir), "EXTRA": extra}
        jobs[name] = cluster.sbatch(
            "--gpus-per-node=0", *CPU_ONLY.split()[2:], f"--output={tmp_path}/{name}.out",
            script, env=env, cwd=tmp_path,
        )  # fmt: skip
    for name, job in jobs.items():
        (record,) = cluster.wait(job, timeout=300)
        text = (tmp_path / f"{name}.out").read_text()
        if name == "quoted":
            assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), text
        else:
            assert record["JobState"] == "FAILED", f"{record}\n{text}"
            assert "unexpected extra argument" in text.lower() or "Got unexpected" in text, text
    (run,) = [p for p in outdir.iterdir() if p.is_dir()]
    assert list((run / "checkpoints").glob("ckpt-*.json")), list(run.iterdir())
    assert not mark.exists()
