"""`synthbreast pipeline`: the whole chain on one machine, one stage after the other.

    data (demo or a real folder) -> ingest -> one conditional MSG-GAN (or, with
    --per-class-gans, one MSG-GAN per class as in the paper) -> generation per class -> the
    collapse gate -> every classification scenario -> fidelity -> report

The stages are those of synthbreast/chain.py, the same list `submit all` submits to Slurm;
each runs the library function its own command runs, with the config written to
OUT/configs/<stage>.json first (the file `synthbreast <command> --config FILE` would read).

The collapse gate: `generate` checks each class's images against the real ones
(synthbreast/eval/quality.py); a collapsed class stops the pipeline before classification,
with the remedy, unless --keep-going (then the report carries a red banner).

Every stage skips or resumes what is already complete, so an interrupted pipeline continues
where it stopped when run again with the same arguments. `--budget` scales the whole chain:
`tiny` (tests, a few minutes), `small` (the CPU demo, under 15 minutes on 2 cores), `paper`
(the paper's numbers; for GPUs). OUT/pipeline.json records the config and each stage's time.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthbreast.chain import (
    CHAIN_CONFIG,
    PIPELINE_BUDGETS,
    RECORD,
    Context,
    Stage,
    check_classifier,
    config_path,
    pipeline_budget,
    plan,
    run_gate,
)
from synthbreast.config import GateConfig, PipelineConfig, save_config, to_dict
from synthbreast.fileio import atomic_write_json

__all__ = ["PIPELINE_BUDGETS", "run_pipeline", "run_stage", "stage_gate"]

Log = Callable[[Any], None]


def run_stage(stage: Stage, ctx: Context) -> str:
    """One stage in process: left out when complete (as `submit all` leaves it out)."""
    if stage.kind.done is not None and stage.kind.done(stage.config):
        return "skipped (complete)"
    return stage.kind.run(stage, ctx)


def stage_gate(config: PipelineConfig, outs: list[Path]) -> str:
    """The collapse gate on generate outputs `outs`, with the pipeline's --keep-going."""
    return run_gate(GateConfig(synthetic=[str(o) for o in outs], keep_going=config.keep_going))


def run_pipeline(config: PipelineConfig, progress, log: Log = print) -> Path:
    """Run every stage; returns the report's HTML path. Stage times go to OUT/pipeline.json."""
    stages = plan(config)
    budget = pipeline_budget(config)
    check_classifier(budget, config.weights_path)  # before the GAN's minutes, not after
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CHAIN_CONFIG)
    record: dict[str, Any] = {
        "config": to_dict(config),
        "budget": dataclasses.asdict(budget),
        "stages": [],
    }
    ctx = Context(progress, log)
    result = ""
    for stage in stages:
        log(f"== {stage.name}")
        path = config_path(out, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_config(stage.config, path)
        started = time.perf_counter()
        result = run_stage(stage, ctx)
        for task in list(progress.task_ids):  # finished bars: the log line below says it
            progress.remove_task(task)
        seconds = round(time.perf_counter() - started, 1)
        record["stages"].append(
            {"stage": stage.name, "command": stage.command, "config": str(path),
             "seconds": seconds, "status": result}
        )  # fmt: skip
        atomic_write_json(out / RECORD, record)
        log(f"   {stage.name}: {result} in {seconds} s")
    from synthbreast.report.render import REPORT_HTML

    report = Path(stages[-1].config.out) / REPORT_HTML
    record["seconds"] = round(sum(s["seconds"] for s in record["stages"]), 1)
    record["report"] = str(report)
    atomic_write_json(out / RECORD, record)
    return report


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
