"""`synthbreast submit` and `synthbreast status`: the chain as Slurm jobs with dependencies.

Each job is one `sbatch` command line on a script of `slurm/` (variables in the environment,
resources in the script's #SBATCH lines, overridable with --sbatch-args). `--dry-run` prints
the lines as a bash script that would submit the same jobs (later lines read the job ids of
earlier ones from shell variables); a real submission records every job in OUT/jobs.jsonl,
which `synthbreast status` reads.

The folders are those of `synthbreast pipeline` (synthbreast/pipeline.py): OUT/shards,
OUT/gan/all/<run> (or OUT/gan/class<c>/<run>),
OUT/synthetic/class<c>, OUT/classify/<scenario>, OUT/report.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synthbreast.errors import UserError

JOBS_FILE = "jobs.jsonl"


def slurm_dir() -> Path:
    """The sbatch scripts: $SYNTHBREAST_SLURM_DIR, else the repository's slurm/ folder."""
    where = os.environ.get("SYNTHBREAST_SLURM_DIR")
    folder = Path(where) if where else Path(__file__).resolve().parents[1] / "slurm"
    if not (folder / "classify.sh").is_file():
        raise UserError(
            f"no sbatch scripts in {folder}: set SYNTHBREAST_SLURM_DIR to the slurm/ folder of a "
            "synthbreast checkout"
        )
    return folder


@dataclass
class Job:
    """One sbatch submission. `after`: names of earlier jobs of the same plan, or job ids."""

    name: str  # also the shell variable that holds its id in a dry-run script
    script: str
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    array: str | None = None
    after: list[str] = field(default_factory=list)
    dependency_type: str = "afterok"

    def command(self, ids: dict[str, str], logs: Path, sbatch_args: list[str]) -> list[str]:
        cmd = ["sbatch", "--parsable", f"--job-name=synthbreast-{self.name}"]
        if self.array:  # %a outside an array job would read 4294967294
            cmd += [f"--array={self.array}", f"--output={logs}/%x-%A_%a.out"]
        else:
            cmd.append(f"--output={logs}/%x-%j.out")
        if self.after:
            parents = ":".join(resolve_id(a, ids) for a in self.after)
            cmd.append(f"--dependency={self.dependency_type}:{parents}")
        return [*cmd, *sbatch_args, "--export=ALL", self.script, *self.args]


def resolve_id(after: str, ids: dict[str, str]) -> str:
    """A job name -> its id; "name_K" -> task K of that array job ("123_K"); else as given."""
    if after in ids:
        return ids[after]
    name, _, task = after.rpartition("_")
    return f"{ids[name]}_{task}" if name in ids and task.isdigit() else after


def array_range(count: int, max_parallel: int | None = None) -> str:
    spec = f"0-{count - 1}"
    return f"{spec}%{max_parallel}" if max_parallel else spec


def dry_run_script(jobs: list[Job], logs: Path, sbatch_args: list[str]) -> str:
    """A bash script that submits `jobs` exactly as `submit_jobs` would."""
    ids = {job.name: "$" + shell_name(job.name) for job in jobs}
    lines = ["#!/bin/bash", "set -euo pipefail", f"mkdir -p {shlex.quote(str(logs))}"]
    for job in jobs:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in job.env.items())
        command = shlex.join(job.command(ids, logs, sbatch_args))
        # job ids stay shell variables, outside the quotes shlex put around the dependency
        for var in ids.values():
            command = command.replace(var, f"'\"{var}\"'")
        lines.append(f"{shell_name(job.name)}=$({env + ' ' if env else ''}{command})")
        lines.append(f'echo "{job.name}: ${shell_name(job.name)}"')
    return "\n".join(lines) + "\n"


def shell_name(name: str) -> str:
    return name.replace("-", "_").replace("+", "_").upper() + "_JOB"


def submit_jobs(jobs: list[Job], out: Path, sbatch_args: list[str]) -> dict[str, str]:
    """Submit in order; returns {job name: Slurm job id}; appends each to OUT/jobs.jsonl."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    for job in jobs:
        command = job.command(ids, logs, sbatch_args)
        try:
            done = subprocess.run(
                command, env={**os.environ, **job.env}, capture_output=True, text=True
            )
        except FileNotFoundError as err:
            raise UserError("sbatch not found: run this on a Slurm login node") from err
        if done.returncode != 0:
            raise UserError(f"sbatch refused {job.name}: {done.stderr.strip()}\n{command}")
        ids[job.name] = done.stdout.strip().split(";")[0]
        record = {
            "name": job.name,
            "job_id": ids[job.name],
            "array": job.array,
            "after": [resolve_id(a, ids) for a in job.after],
            "dependency_type": job.dependency_type,
            "env": job.env,
            "sbatch_args": sbatch_args,
            "command": command,
            "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with open(out / JOBS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return ids


# --- plans ----------------------------------------------------------------------------------


def classify_job(
    real: Path, synthetic: list[Path], out: Path, extra: str, tasks: str, after: list[str]
) -> Job:
    env = {
        "REAL": str(real),
        "SYNTHETIC": " ".join(str(s) for s in synthetic),
        "OUT": str(out),
        "EXTRA": extra,
    }
    return Job("classify", str(slurm_dir() / "classify.sh"), env, array=tasks, after=after)


def report_job(runs: Path, out: Path, after: list[str]) -> Job:
    # afterany: a failed scenario must be listed in the report, not block it forever
    env = {"RUNS": str(runs), "OUT": str(out)}
    return Job(
        "report", str(slurm_dir() / "report.sh"), env, after=after, dependency_type="afterany"
    )


def study_jobs(
    real: Path, synthetic: list[Path], out: Path, study_args: list[str], tasks: str
) -> list[Job]:
    """The augmentation study: one array job (task k = the study's task k, slurm/study.sh),
    then its summary (`synthbreast study --out OUT --collect`) and the report of OUT, each
    afterany: a failed task is listed in the summary and the report, not waited for forever.
    The folder is STUDY, not OUT, in the array's environment: `status` reruns REAL/SYNTHETIC/OUT
    arrays as classify scenarios."""
    env = {
        "REAL": str(real),
        "SYNTHETIC": " ".join(str(s) for s in synthetic),
        "STUDY": str(out),
        "EXTRA": " ".join(study_args),
    }
    summary_args = ["study", "--out", str(out), "--collect"]
    return [
        Job("study", str(slurm_dir() / "study.sh"), env, array=tasks),
        Job("study-summary", str(slurm_dir() / "run.sh"), args=summary_args, after=["study"],
            dependency_type="afterany"),
        report_job(out, out / "report", ["study-summary"]),
    ]  # fmt: skip


def plan_all(
    data: Path | None,
    out: Path,
    demo: bool,
    settings: dict[str, Any],
    classes: list[int],
    max_parallel: int | None,
    patch_size: int = 50,
    per_class_gans: bool = False,
) -> list[Job]:
    """ingest -> one conditional GAN (or one per class) -> generation per class -> scenario
    array -> fidelity -> report. Stages found complete now (demo data, ingest) are left out,
    as `pipeline` skips them; later stages skip what is complete themselves."""
    from synthbreast.eval.scenarios import scenario_names

    scripts = slurm_dir()
    run = str(scripts / "run.sh")
    shards, synthetic = out / "shards", out / "synthetic"
    jobs: list[Job] = []
    ingest_after = []
    if demo:
        data = out / "data"
        if not demo_data_complete(data, settings):  # a resubmission continues the chain
            demo_args = ["demo-data", str(data), "--patients", str(settings["demo_patients"])]
            demo_args += ["--per-class", str(settings["demo_per_class"])]
            jobs.append(Job("demo-data", run, args=demo_args))
            ingest_after = ["demo-data"]
    assert data is not None
    gan_after = []
    # a complete ingest is not redone: `ingest --resume` would rewrite its manifest, and the
    # fidelity of a resubmitted chain would then refuse its own earlier result
    if _status(shards / "manifest.json") != "complete":
        ingest_args = ["ingest", str(data), str(shards), "--small-patches", "pad", "--resume"]
        jobs.append(Job("ingest", run, args=ingest_args, after=ingest_after))
        gan_after = ["ingest"]
    generated = []
    budget = f"--budget {settings['gan_budget']}"
    budget += f" --kimg {settings['gan_kimg']}" if settings["gan_kimg"] else ""
    if not per_class_gans:  # one conditional model draws every class (as `pipeline`)
        gan_env = {"SHARDS": str(shards), "OUTDIR": str(out / "gan" / "all"),
                   "EXTRA": f"--model msggan-cond {budget}"}  # fmt: skip
        jobs.append(Job("gan", str(scripts / "train_gan.sh"), gan_env, after=gan_after))
    for c in classes:
        gan_name, gan_out = ("gan", out / "gan" / "all")
        if per_class_gans:
            gan_name, gan_out = f"gan-class{c}", out / "gan" / f"class{c}"
            gan_env = {"SHARDS": str(shards), "CLASS": str(c), "OUTDIR": str(gan_out),
                       "EXTRA": f"--model msggan {budget}"}  # fmt: skip
            jobs.append(Job(gan_name, str(scripts / "train_gan.sh"), gan_env, after=gan_after))
        gen_env = {
            "CHECKPOINT": str(gan_out),
            "OUT": str(synthetic / f"class{c}"),
            "SHARDS": str(settings["synth_shards"]),
            "PER_SHARD": str(settings["synth_per_shard"]),
            "CLASS": str(c),
            "OUTPUT_SIZE": str(patch_size),  # the real patch size, as in the pipeline
        }
        tasks = array_range(min(settings["synth_shards"], 8), max_parallel)
        name = f"generate-class{c}"
        jobs.append(Job(name, str(scripts / "generate.sh"), gen_env, array=tasks, after=[gan_name]))
        generated.append(name)
    extra = f"--backbone {settings['backbone']} --weights {settings['weights']}"
    extra += f" --epochs {settings['classify_epochs']}"
    extra += f" --input-size {settings['input_size']}"
    tasks = array_range(len(scenario_names()), max_parallel)
    jobs.append(classify_job(shards, [synthetic], out / "classify", extra, tasks, generated))
    fidelity_args = ["fidelity", "--real", str(shards), "--synthetic", str(synthetic)]
    fidelity_args += ["--out", str(out / "fidelity")]
    for name in settings["fidelity_extractors"]:  # none named: the default extractors
        fidelity_args += ["--extractor", name]
    # fidelity needs the synthetic sets only (it trains its own histology space), so it runs
    # beside the classifier array
    jobs.append(Job("fidelity", run, args=fidelity_args, after=generated))
    jobs.append(report_job(out, out / "report", ["classify", "fidelity"]))
    return jobs


def demo_data_complete(data: Path, settings: dict[str, Any]) -> bool:
    """The demo dataset the chain would write is already there (as `pipeline` checks)."""
    from synthbreast.config import DemoDataConfig, to_dict
    from synthbreast.data.demo import DEMO_MARKER

    marker = data / DEMO_MARKER
    if not data.exists():
        return False
    if not marker.is_file():
        raise UserError(
            f"{data} exists and is not a synthbreast demo dataset; use another --out, or --data"
        )
    written = json.loads(marker.read_text())["config"]
    job = DemoDataConfig(str(data), settings["demo_patients"], settings["demo_per_class"])
    wanted = {k: v for k, v in to_dict(job).items() if k not in ("out", "overwrite")}
    if written != wanted:
        raise UserError(
            f"{data} holds demo data of another config ({written}); use another --out or delete "
            "that folder"
        )
    return True


# --- status ---------------------------------------------------------------------------------


def read_jobs(out: Path) -> list[dict[str, Any]]:
    """The jobs submitted with --out OUT, then those of its subfolders (a scenario task
    resubmitted with `submit classify --out OUT/classify`), in submission order."""
    paths = [p for p in [out / JOBS_FILE, *sorted(out.glob(f"*/{JOBS_FILE}"))] if p.is_file()]
    if not paths:
        raise UserError(f"{out / JOBS_FILE} not found: nothing was submitted with --out {out}")
    jobs = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    return sorted(jobs, key=lambda job: job["submitted"])  # stable: file order within a second


def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job id or array task id (123_4): state} from sacct, else squeue + scontrol."""
    states: dict[str, str] = {}
    ids = ",".join(job_ids)
    sacct = _run(["sacct", "-n", "-P", "-X", "-j", ids, "--format=JobID,State"])
    if sacct is not None:
        for line in sacct.splitlines():
            job, _, state = line.partition("|")
            states[job] = state.split()[0] if state else "UNKNOWN"
        if states:
            return states
    for job in job_ids:  # no accounting: ask the controller (it forgets finished jobs later)
        shown = _run(["scontrol", "-o", "show", "job", job])
        for line in (shown or "").splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            task = fields.get("ArrayTaskId")
            key = f"{fields.get('ArrayJobId', job)}_{task}" if task else fields.get("JobId", job)
            states[key] = fields.get("JobState", "UNKNOWN")
    return states


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def stage_outputs(out: Path) -> dict[str, str]:
    """Which outputs of the chain exist, read from the files themselves."""
    from synthbreast.eval.scenarios import scenario_names

    found = {}
    manifest = out / "shards" / "manifest.json"
    found["shards"] = _status(manifest)
    for folder in sorted((out / "synthetic").glob("class*")):
        found[f"synthetic/{folder.name}"] = _status(folder / "manifest.json")
    for name in scenario_names():
        run = out / "classify" / name
        if (run / "metrics.json").exists():
            found[f"classify/{name}"] = "complete"
        elif (run / "failed.json").exists():
            error = json.loads((run / "failed.json").read_text()).get("error", "")
            found[f"classify/{name}"] = f"failed: {error[:80]}"
        else:
            found[f"classify/{name}"] = "missing"
    found["fidelity"] = "complete" if (out / "fidelity" / "fidelity.json").exists() else "missing"
    found["report"] = "complete" if (out / "report" / "report.html").exists() else "missing"
    return found


def _status(manifest: Path) -> str:
    if not manifest.exists():
        return "missing"
    return json.loads(manifest.read_text()).get("status", "unknown")


# Slurm states of a task that ended without its result
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL")


def resubmit_commands(jobs: list[dict[str, Any]], states: dict[str, str]) -> list[str]:
    """`synthbreast submit classify` lines that rerun exactly the scenario tasks whose latest
    run failed and that still have no metrics.json, with the flags they were submitted with."""
    from synthbreast.eval.scenarios import scenario_names

    names = scenario_names()
    latest: dict[tuple[str, int], tuple[int, str]] = {}  # (OUT, task) -> (job index, state)
    for index, job in enumerate(jobs):
        if not {"REAL", "SYNTHETIC", "OUT"} <= job.get("env", {}).keys():
            continue  # not a scenario array
        for key, state in states.items():
            parent, _, task = key.partition("_")
            if parent == job["job_id"] and task.isdigit():
                latest[(job["env"]["OUT"], int(task))] = (index, state)
    failed: dict[int, list[int]] = {}
    for (out, task), (index, state) in sorted(latest.items()):
        if state in FAILED_STATES and not (Path(out) / names[task] / "metrics.json").exists():
            failed.setdefault(index, []).append(task)
    lines = []
    for index, tasks in sorted(failed.items()):
        job, env = jobs[index], jobs[index]["env"]
        command = ["synthbreast", "submit", "classify", "--real", env["REAL"]]
        for folder in env["SYNTHETIC"].split():
            command += ["--synthetic", folder]
        command += ["--out", env["OUT"], "--tasks", ",".join(map(str, tasks))]
        if env.get("EXTRA"):
            command += ["--extra", env["EXTRA"]]
        if job.get("sbatch_args"):
            command += ["--sbatch-args", shlex.join(job["sbatch_args"])]
        lines.append(shlex.join(command))
    return lines
