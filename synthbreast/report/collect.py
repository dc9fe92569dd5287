"""Find and read every result file under a runs folder; nothing here trains or evaluates.

What is looked for (formats in notes/contracts.md), anywhere below RUNS:
- classify run folders: `metrics.json` (schema synthbreast-classify-metrics/1), `failed.json`,
  or a `config.json` of job ClassifyConfig with neither (started, no result yet);
- GAN run folders: `config.json` of job TrainGANConfig with `stats.jsonl`, `samples/fakes-*.png`
  and `metric-texture.jsonl` (the collapse check at every snapshot);
- shard folders: `manifest.json` of schema synthbreast-shards/1, real (ingest) or synthetic
  (generate, `source.synthetic` true, with its collapse check under `quality`);
- `fidelity.json` (schema synthbreast-fidelity/3, or /2: without SiFID).

File names and schema ids come from synthbreast/results.py, as the writers' do.

A file that cannot be read becomes a line in `Collected.problems`, never an exception: the
report must still appear, and say what was wrong.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthbreast.data.shards import MANIFEST, SCHEMA, decode_image, image_bytes, iter_shard
from synthbreast.errors import UserError
from synthbreast.eval.metrics import result_problem
from synthbreast.eval.scenarios import scenario_names
from synthbreast.eval.study import STUDY_JOB, read_study, summarise
from synthbreast.fileio import read_json, sha256_file
from synthbreast.results import (
    CONFIG,
    FAILED,
    FIDELITY,
    FIDELITY_READABLE,
    FIDELITY_SCHEMA,
    METRIC_FILE,
    METRICS,
    METRICS_SCHEMA,
    NOT_RESULTS,
    STATS,
)

OK, FAILED_STATUS, MISSING = "ok", "failed", "missing"
SKIP_DIRS = set(NOT_RESULTS)
# stats.jsonl keys of the discriminator and generator loss: the training loop writes
# d_loss/g_loss; notes/contracts.md names them loss_d/loss_g. Both are read.
LOSS_KEYS = {"loss_d": ("loss_d", "d_loss"), "loss_g": ("loss_g", "g_loss")}


@dataclass
class ScenarioRun:
    """The result of one scenario: ok (metrics), failed (error) or missing (nothing, or no
    result in a started run folder)."""

    name: str
    status: str  # OK | FAILED_STATUS | MISSING
    folder: Path | None = None
    metrics: dict[str, Any] | None = None
    metrics_path: Path | None = None
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    error: str | None = None  # failed: the run's error; missing: why it counts as missing
    others: list[Path] = field(default_factory=list)  # older results of the same scenario


@dataclass
class GanRun:
    folder: Path
    config: dict[str, Any]
    stats: list[dict[str, Any]]
    samples: list[Path]  # samples/fakes-*.png, oldest first
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metric-texture.jsonl lines

    @property
    def class_label(self) -> int | None:
        return self.config.get("class_label")

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass
class ShardFolder:
    folder: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("source", {}).get("synthetic"))

    @property
    def demo(self) -> bool:
        return bool(self.manifest.get("source", {}).get("demo"))

    @property
    def format(self) -> str:
        """The ingest layout the shards came from (idc, mias, cbis-ddsm, csv, ...)."""
        return str(self.manifest.get("source", {}).get("format") or "idc")

    def labels(self) -> list[int]:
        """Classes present in this folder's shards, from the manifest alone."""
        found = {int(c) for s in self.manifest.get("shards", []) for c in s.get("counts", {})}
        return sorted(found)

    @property
    def quality(self) -> dict[str, Any]:
        """generate's collapse check of these images; {} where the manifest has none (written
        before the check existed) or it is not a dict."""
        quality = self.manifest.get("quality")
        return quality if isinstance(quality, dict) else {}

    @property
    def collapsed(self) -> dict[str, list[str]]:
        """Class -> why its images count as collapsed; empty when fine or not checked."""
        quality = self.quality
        if quality.get("checked") is not True:
            return {}
        found = quality.get("collapsed")
        if found is None and isinstance(quality.get("classes"), dict):
            # figures without a verdict (written by hand): judge them by the same thresholds
            from synthbreast.eval.quality import collapse_reasons  # imports torch: only here

            found = {
                str(c): r
                for c, m in quality["classes"].items()
                if isinstance(m, dict) and (r := collapse_reasons(m))
            }
        if not isinstance(found, dict):
            return {}
        return {
            str(c): [str(r) for r in (reasons if isinstance(reasons, list) else [reasons])]
            for c, reasons in found.items()
            if reasons
        }


@dataclass
class StudyRun:
    """A `synthbreast study` folder: its summary recomputed from the task files now (None, with
    `error`, when the study cannot be read)."""

    folder: Path
    summary: dict[str, Any] | None
    error: str | None = None


def read_study_run(folder: Path, problems: list[str]) -> StudyRun:
    try:
        config, results, failed = read_study(folder, problems)
        return StudyRun(folder, summarise(config, results, failed))
    except (UserError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        error = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        problems.append(f"{folder}: the study cannot be summarised ({error})")
        return StudyRun(folder, None, error)


@dataclass
class Collected:
    runs: Path
    scenarios: list[ScenarioRun]  # the registry's scenarios in order, then unknown names
    gan_runs: list[GanRun] = field(default_factory=list)
    real_shards: list[ShardFolder] = field(default_factory=list)
    synthetic_shards: list[ShardFolder] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None
    fidelity_path: Path | None = None
    problems: list[str] = field(default_factory=list)
    studies: list[StudyRun] = field(default_factory=list)  # `synthbreast study` folders


# --- walking RUNS ------------------------------------------------------------------------------


def _walk(runs: Path, exclude: set[Path]) -> list[tuple[Path, set[str]]]:
    """(folder, file names) of every folder below RUNS, sorted, pruning folders of no results."""
    found = []
    for top, dirs, files in os.walk(runs):
        here = Path(top)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d not in SKIP_DIRS and (here / d).resolve() not in exclude
        )
        found.append((here, set(files)))
    return found


def _read(path: Path, problems: list[str]) -> Any | None:
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        problems.append(f"{path}: cannot be read as JSON ({err})")
        return None


def _read_jsonl(path: Path, problems: list[str], objects: bool = False) -> list[dict[str, Any]]:
    """The JSON lines of a file; `objects`: only JSON objects (others become problems)."""
    lines = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        problems.append(f"{path}: cannot be read ({err})")
        return lines
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            # the last line of a run killed mid-write; earlier ones still plot
            problems.append(f"{path}:{number}: not a JSON line (skipped)")
            continue
        if objects and not isinstance(value, dict):
            problems.append(f"{path}:{number}: not a JSON object (skipped)")
            continue
        lines.append(value)
    return lines


def loss_value(line: dict[str, Any], which: str) -> float | None:
    """loss_d or loss_g of one stats.jsonl line, under either of its names."""
    for key in LOSS_KEYS[which]:
        if isinstance(line.get(key), (int, float)):
            return float(line[key])
    return None


# --- scenarios ---------------------------------------------------------------------------------


def scenario_of(
    folder: Path, result: dict[str, Any], config: dict[str, Any], names: list[str]
) -> str | None:
    """A run's scenario: its result says; else its config (a name, or a Slurm array index);
    else the run folder's name, which classify names after the scenario."""
    if result.get("scenario"):
        return result["scenario"]
    if config.get("scenario") and config["scenario"] != "all":
        return config["scenario"]
    task_id = config.get("task_id")
    if isinstance(task_id, int) and 0 <= task_id < len(names):
        return names[task_id]
    return folder.name if folder.name in names else None


def _classify_result(
    folder: Path, files: set[str], problems: list[str], names: list[str]
) -> tuple[str, ScenarioRun, float] | None:
    """(scenario name, its result, time of the result) for a classify run folder, else None."""
    config = _read(folder / CONFIG, problems) if CONFIG in files else None
    if config is not None and not isinstance(config, dict):
        config = None
    is_classify_config = bool(config) and config.get("job") == "ClassifyConfig"
    metrics, unreadable = None, None
    if METRICS in files:
        try:
            metrics = read_json(folder / METRICS)
            unreadable = result_problem(metrics)
        except (OSError, ValueError) as err:
            unreadable = f"not JSON: {err}"
        is_ours = isinstance(metrics, dict) and (
            "scenario" in metrics or metrics.get("schema") == METRICS_SCHEMA
        )
        if unreadable and not (is_classify_config or is_ours or metrics is None):
            unreadable = None  # another tool's metrics.json: not a classify run
        elif unreadable:
            problems.append(f"{folder / METRICS} is unreadable ({unreadable}); ignored")
        if unreadable or not is_ours:
            metrics = None
    failed = _read(folder / FAILED, problems) if FAILED in files else None
    if failed is not None and not isinstance(failed, dict):
        failed = None
    if metrics is None and failed is None and not is_classify_config and not unreadable:
        return None
    name = scenario_of(folder, metrics or failed or {}, config or {}, names)
    if not name:
        problems.append(f"{folder}: a classify run folder without a scenario name; ignored")
        return None
    config_path = folder / CONFIG if config is not None else None
    run = ScenarioRun(name, MISSING, folder, config=config, config_path=config_path)
    metrics_time = (folder / METRICS).stat().st_mtime if metrics is not None else -1.0
    failed_time = (folder / FAILED).stat().st_mtime if failed is not None else -1.0
    if metrics is not None and metrics_time >= failed_time:
        run.status, run.metrics, run.metrics_path = OK, metrics, folder / METRICS
        return name, run, metrics_time
    if failed is not None:
        run.status = FAILED_STATUS
        run.error = str(failed.get("error") or "no error message in failed.json")
        run.metrics_path = folder / FAILED
        return name, run, failed_time
    if unreadable:
        run.error = (
            f"{folder / METRICS} is unreadable ({unreadable}): rerun the same classify command "
            "to redo the scenario"
        )
        return name, run, (folder / METRICS).stat().st_mtime
    run.error = f"{folder} has config.json but no metrics.json or failed.json (running or killed)"
    return name, run, (folder / CONFIG).stat().st_mtime


def _pick(candidates: list[tuple[ScenarioRun, float]]) -> ScenarioRun:
    """A finished result over an unfinished one, then the newest; the rest become `others`."""
    rank = {OK: 2, FAILED_STATUS: 2, MISSING: 1}
    ordered = sorted(candidates, key=lambda c: (rank[c[0].status], c[1]), reverse=True)
    chosen = ordered[0][0]
    chosen.others = [run.folder for run, _ in ordered[1:] if run.folder is not None]
    return chosen


# --- everything --------------------------------------------------------------------------------


def collect(runs: str | Path, exclude: list[str | Path] | None = None) -> Collected:
    """Read every result under `runs` (skipping the folders in `exclude`, e.g. the report's)."""
    runs = Path(runs)
    problems: list[str] = []
    skip = {Path(p).resolve() for p in exclude or []}
    by_scenario: dict[str, list[tuple[ScenarioRun, float]]] = {}
    gan_runs: list[GanRun] = []
    real, synthetic = [], []
    fidelity, fidelity_path = None, None
    expected = scenario_names()
    studies: list[StudyRun] = []
    for folder, files in _walk(runs, skip):
        result = _classify_result(folder, files, problems, expected)
        if result is not None:
            name, run, when = result
            by_scenario.setdefault(name, []).append((run, when))
            continue
        if CONFIG in files:
            config = _read(folder / CONFIG, problems)
            if isinstance(config, dict) and config.get("job") == STUDY_JOB:
                studies.append(read_study_run(folder, problems))
        if CONFIG in files and STATS in files:
            config = _read(folder / CONFIG, problems)
            if isinstance(config, dict) and config.get("job") == "TrainGANConfig":
                samples = sorted((folder / "samples").glob("fakes-*.png"))
                stats = _read_jsonl(folder / STATS, problems)
                metric_lines = []
                if METRIC_FILE in files:
                    metric_lines = _read_jsonl(folder / METRIC_FILE, problems, objects=True)
                gan_runs.append(GanRun(folder, config, stats, samples, metric_lines))
        if MANIFEST in files:
            manifest = _read(folder / MANIFEST, problems)
            if isinstance(manifest, dict) and manifest.get("schema") == SCHEMA:
                shards = ShardFolder(folder, manifest, sha256_file(folder / MANIFEST))
                (synthetic if shards.synthetic else real).append(shards)
        if FIDELITY in files:
            data = _read(folder / FIDELITY, problems)
            if isinstance(data, dict) and data.get("schema") in FIDELITY_READABLE:
                if fidelity is not None:
                    problems.append(
                        f"{folder / FIDELITY}: a second fidelity.json; the report shows "
                        f"{fidelity_path}"
                    )
                else:
                    fidelity, fidelity_path = data, folder / FIDELITY
            elif data is not None:
                problems.append(f"{folder / FIDELITY}: schema is not {FIDELITY_SCHEMA!r}")

    scenarios = []
    for name in [*expected, *sorted(set(by_scenario) - set(expected))]:
        if name in by_scenario:
            scenarios.append(_pick(by_scenario[name]))
        else:
            scenarios.append(ScenarioRun(name, MISSING, error=f"no run folder found under {runs}"))
    for name in sorted(set(by_scenario) - set(expected)):
        problems.append(f"scenario {name!r} is not in the registry (synthbreast/eval/scenarios.py)")
    # Shards a result names may lie outside RUNS: read those manifests too, so the grids and
    # the demo-data warning do not depend on where the shards were kept.
    known = {(f.folder / MANIFEST).resolve() for f in [*real, *synthetic]}
    for run in scenarios:
        for side in ("train", "test"):
            data = ((run.metrics or {}).get("data") or {}).get(side) or {}
            for entry in data.get("manifests", []):
                path = Path(entry.get("path", ""))
                if path.name != MANIFEST or not path.is_file() or path.resolve() in known:
                    continue
                known.add(path.resolve())
                manifest = _read(path, problems)
                if isinstance(manifest, dict) and manifest.get("schema") == SCHEMA:
                    shards = ShardFolder(path.parent, manifest, sha256_file(path))
                    (synthetic if shards.synthetic else real).append(shards)
    gan_runs.sort(key=lambda r: (r.class_label is None, r.class_label or 0, r.name))
    # the real shards a study split, for the demo-data warning and provenance
    for study in studies:
        config = (study.summary or {}).get("config") or {}
        path = Path(str(config.get("real", ""))) / MANIFEST
        if config.get("real") and path.is_file() and path.resolve() not in known:
            known.add(path.resolve())
            manifest = _read(path, problems)
            if isinstance(manifest, dict) and manifest.get("schema") == SCHEMA:
                real.append(ShardFolder(path.parent, manifest, sha256_file(path)))
    collected = Collected(
        runs, scenarios, gan_runs, real, synthetic, fidelity, fidelity_path, problems
    )
    collected.studies = studies
    return collected


# --- sample images for the grids ---------------------------------------------------------------


def sample_images(
    folders: list[ShardFolder],
    label: int,
    count: int,
    seed: int = 0,
    pool: str | None = None,
    candidates_per_image: int = 4,
) -> list[np.ndarray]:
    """Up to `count` decoded images (HxWx3 uint8) of class `label`, drawn at random.

    Shards are read in a seeded random order until `candidates_per_image` times `count`
    images of the class have been seen (a full IDC ingest is ~30 shards of 5,000: reading all
    would take longer than the rest of the report), then `count` are chosen from them.
    """
    rng = random.Random(f"{seed}:{label}")
    shards = []
    for shard_folder in folders:
        for entry in shard_folder.manifest.get("shards", []):
            if pool is not None and entry.get("pool") != pool:
                continue
            if entry.get("counts", {}).get(str(label), 0) > 0:
                shards.append(shard_folder.folder / entry["name"])
    rng.shuffle(shards)
    seen: list[bytes] = []
    for path in shards:
        if len(seen) >= count * candidates_per_image:
            break
        if not path.is_file():
            continue
        for sample in iter_shard(path):
            if int(sample["cls"]) == label:
                seen.append(image_bytes(sample))
    chosen = rng.sample(seen, min(count, len(seen)))
    return [np.asarray(decode_image(data)) for data in chosen]
