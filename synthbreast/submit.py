"""`synthbreast submit` and `synthbreast status`: the chain as Slurm jobs with dependencies.

Each job is one `sbatch` command line on a script of `slurm/` (resources in the script's
#SBATCH lines, overridable with --sbatch-args). A stage of the chain (synthbreast/chain.py)
is submitted as `synthbreast <command> --config FILE`: its config is written to
OUT/configs/<stage>.json and the script gets the file's path (CONFIG, or run.sh's arguments),
never the settings as flags, so no path or value is ever parsed by a shell. `--dry-run`
prints a bash script that writes the same config files and submits the same jobs (later lines
read the job ids of earlier ones from shell variables); a real submission records every job in
OUT/jobs.jsonl, which `synthbreast status` reads.
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
from synthbreast.fileio import atomic_write_bytes

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
    stage: str | None = None  # the synthbreast command it runs with --config (for status)
    config: str | None = None  # that config file
    files: dict[str, str] = field(default_factory=dict)  # written before it is submitted

    def command(self, ids: dict[str, str], logs: Path, sbatch_args: list[str]) -> list[str]:
        cmd = ["sbatch", "--parsable", f"--job-name=synthbreast-{self.name}"]
        if self.array:  # %a outside an array job would read 4294967294
            cmd += [f"--array={self.array}", f"--output={logs}/%x-%A_%a.out"]
        else:
            cmd.append(f"--output={logs}/%x-%j.out")
        if self.after:
            parents = ":".join(resolve_id(a, ids) for a in self.after)
            cmd.append(f"--dependency={self.dependency_type}:{parents}")
            if self.dependency_type == "afterok":  # a failed parent cancels it, not pends it
                cmd.append("--kill-on-invalid-dep=yes")
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


def task_spec(count: int, tasks: str | None, max_parallel: int | None) -> str:
    """--tasks (or every task) with the --max-parallel cap."""
    spec = tasks or f"0-{count - 1}"
    return f"{spec}%{max_parallel}" if max_parallel else spec


def dry_run_script(
    jobs: list[Job], logs: Path, sbatch_args: list[str], notes: list[str] = ()
) -> str:
    """A bash script that writes the same files and submits `jobs` exactly as `submit_jobs`."""
    ids = {job.name: "$" + shell_name(job.name) for job in jobs}
    lines = ["#!/bin/bash", "set -euo pipefail", *(f"# {note}" for note in notes)]
    lines.append(f"mkdir -p {shlex.quote(str(logs))}")
    for job in jobs:
        for path, text in job.files.items():
            # a quoted here-document: the JSON is written as it is, never expanded
            lines.append(f"mkdir -p {shlex.quote(str(Path(path).parent))}")
            lines.append(f"cat > {shlex.quote(path)} <<'SYNTHBREAST_CONFIG'")
            lines.append(text.rstrip("\n"))
            lines.append("SYNTHBREAST_CONFIG")
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


def write_files(files: dict[str, str]) -> None:
    for path, text in files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), text.encode())


def submit_jobs(jobs: list[Job], out: Path, sbatch_args: list[str]) -> dict[str, str]:
    """Submit in order; returns {job name: Slurm job id}; appends each to OUT/jobs.jsonl."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    for job in jobs:
        write_files(job.files)
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
            "stage": job.stage,
            "config": job.config,
            "sbatch_args": sbatch_args,
            "command": command,
            "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with open(out / JOBS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return ids


# --- plans ----------------------------------------------------------------------------------


def stage_job(stage, folder: Path, tasks: str | None = None, after: list[str] = ()) -> Job:
    """`synthbreast <command> --config FILE` for one stage of synthbreast/chain.py, its config
    written to FOLDER/configs/ (an existing identical file is reused)."""
    from synthbreast.chain import config_path, config_text

    path = config_path(folder, stage)
    text = config_text(stage.config)
    files = {} if path.is_file() else {str(path)}
    script = str(slurm_dir() / stage.kind.script)
    env, args = {}, []
    if stage.kind.script == "run.sh":  # any one command: its arguments, unchanged
        args = [stage.command, "--config", str(path)]
    else:
        env = {**stage.kind.env(stage.config), "CONFIG": str(path)}
    if stage.array is not None and tasks is None:
        tasks = array_range(stage.array)
    return Job(
        stage.name, script, env, args, array=tasks, after=list(after),
        dependency_type=stage.dependency, stage=stage.command, config=str(path),
        files={p: text for p in files},
    )  # fmt: skip


def plan_jobs(stages: list, out: Path, max_parallel: int | None) -> tuple[list[Job], list[str]]:
    """The chain's stages as jobs; the stages complete now are left out (as `pipeline` skips
    them) and named in the notes. Later stages skip what is complete themselves."""
    jobs, notes, left_out = [], [], set()
    for stage in stages:
        if stage.kind.done is not None and stage.kind.done(stage.config):
            left_out.add(stage.name)
            notes.append(f"{stage.name}: complete, not submitted")
            continue
        tasks = array_range(stage.array, max_parallel) if stage.array is not None else None
        after = [name for name in stage.after if name not in left_out]
        jobs.append(stage_job(stage, out, tasks, after))
    return jobs, notes


def classify_job(config, tasks: str) -> Job:
    """The scenario array of a ClassifyConfig; its config and jobs.jsonl go to its OUT."""
    from synthbreast.chain import Stage

    return stage_job(Stage("classify", "classify", config), Path(config.out), tasks)


def train_singan_job(config, tasks: str) -> Job:
    """The models of a TrainSinGANConfig as one array: task k trains model k
    (slurm/train_singan.sh adds --task-id $SLURM_ARRAY_TASK_ID). Its config goes to
    OUTDIR/configs/train-singan.json."""
    from synthbreast.chain import Stage

    stage = Stage("train-singan", "train-singan", config, array=config.images)
    return stage_job(stage, Path(config.outdir), tasks)


def generate_singan_job(config, tasks: str, after: list[str]) -> Job:
    """The shards of a GenerateSinGANConfig as one array (each task its block of shards), its
    config in MODELS/configs/: generate-singan refuses an OUT holding other files."""
    from synthbreast.chain import Stage

    stage = Stage("generate-singan", "generate-singan", config)
    return stage_job(stage, Path(config.models), tasks, after)


def report_job(runs: Path, out: Path, after: list[str]) -> Job:
    # afterany: a failed scenario must be listed in the report, not block it forever
    from synthbreast.chain import Stage
    from synthbreast.config import ReportConfig

    stage = Stage("report", "report", ReportConfig(runs=str(runs), out=str(out)),
                  dependency="afterany")  # fmt: skip
    return stage_job(stage, runs, after=after)


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
        Job("report", str(slurm_dir() / "report.sh"),
            {"RUNS": str(out), "OUT": str(out / "report")}, after=["study-summary"],
            dependency_type="afterany"),
    ]  # fmt: skip


# --- status ---------------------------------------------------------------------------------


def read_jobs(out: Path, required: bool = True) -> list[dict[str, Any]]:
    """The jobs submitted with --out OUT, then those of its subfolders (a scenario task
    resubmitted with `submit classify --out OUT/classify`), in submission order. None at all
    is an error when `required` (a `pipeline` OUT has no jobs but its chain's outputs)."""
    paths = [p for p in [out / JOBS_FILE, *sorted(out.glob(f"*/{JOBS_FILE}"))] if p.is_file()]
    if not paths and not required:
        return []
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


def chain_outputs(out: Path, jobs: list[dict[str, Any]]) -> dict[str, str]:
    """Which outputs exist, each stage asked for its own: the chain of OUT/config.json (a
    `pipeline` or `submit all` OUT), then the stages of the jobs submitted with a config."""
    from synthbreast.chain import CHAIN_CONFIG, STAGE_KINDS, Stage, outputs, plan
    from synthbreast.config import PipelineConfig, load_config

    stages = []
    if (out / CHAIN_CONFIG).is_file():
        try:
            stages = plan(load_config(out / CHAIN_CONFIG, PipelineConfig))
        except UserError:
            stages = []  # not a chain's folder (another job's config.json)
    for job in jobs:
        kind = STAGE_KINDS.get(job.get("stage") or "")
        if kind is not None and job.get("config") and Path(job["config"]).is_file():
            config = load_config(Path(job["config"]), kind.config_type)
            stages.append(Stage(job["name"], kind.command, config))
    return outputs(stages, out)


# Slurm states of a task that ended without its result
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL")


def resubmit_commands(jobs: list[dict[str, Any]], states: dict[str, str]) -> list[str]:
    """`synthbreast submit classify` lines that rerun exactly the scenario tasks whose latest
    run failed and that still have no metrics.json, with the config they were submitted with."""
    from synthbreast.config import ClassifyConfig, load_config
    from synthbreast.eval.scenarios import scenario_names
    from synthbreast.results import METRICS

    names = scenario_names()
    latest: dict[tuple[str, int], tuple[int, str]] = {}  # (OUT, task) -> (job index, state)
    outs: dict[int, Path] = {}
    for index, job in enumerate(jobs):
        if job.get("stage") != "classify" or not Path(job.get("config") or "").is_file():
            continue  # not a scenario array
        outs[index] = Path(load_config(Path(job["config"]), ClassifyConfig).out)
        for key, state in states.items():
            parent, _, task = key.partition("_")
            if parent == job["job_id"] and task.isdigit():
                latest[(str(outs[index]), int(task))] = (index, state)
    failed: dict[int, list[int]] = {}
    for (out, task), (index, state) in sorted(latest.items()):
        if state in FAILED_STATES and not (Path(out) / names[task] / METRICS).exists():
            failed.setdefault(index, []).append(task)
    lines = []
    for index, tasks in sorted(failed.items()):
        job = jobs[index]
        command = ["synthbreast", "submit", "classify", "--config", job["config"]]
        command += ["--tasks", ",".join(map(str, tasks))]
        if job.get("sbatch_args"):
            command += ["--sbatch-args", shlex.join(job["sbatch_args"])]
        lines.append(shlex.join(command))
    return lines
