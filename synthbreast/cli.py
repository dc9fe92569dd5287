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
    out: Annotated[Path, typer.Argument(help="Folder to create (IDC layout).")],
    patients: Annotated[int, typer.Option(help="Number of demo patients.")] = 20,
    per_class: Annotated[int, typer.Option(help="Patches per class per patient.")] = 50,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing demo dataset at OUT.")
    ] = False,
) -> None:
    """Write the embedded demo dataset: procedural H&E-like patches in the Kaggle IDC layout.

    It is demo data, not real tissue: class 1 (IDC) has denser, larger, more irregular nuclei;
    every patient has its own stain tint. 20 patients x 2 classes x 50 = 2,000 patches.
    """
    from synthbreast.data.demo import write_demo_dataset

    config = DemoDataConfig(str(out), patients, per_class, seed, overwrite=overwrite)
    with progress_bar() as progress:
        task = progress.add_task("demo patches", total=patients * per_class * 2)
        write_demo_dataset(config, on_progress=lambda n: progress.advance(task, n))
    console.print(
        f"wrote {patients * per_class * 2} demo patches of {patients} patients to {out} "
        "[yellow](procedural demo data, not real tissue)[/]"
    )


@app.command()
@user_errors
def ingest(
    src: Annotated[Path, typer.Argument(help="Image folder to read.")],
    out: Annotated[Path, typer.Argument(help="Folder for the shards and manifest.json.")],
    format: Annotated[Format, typer.Option(help="Source layout.")] = "idc",
    patient_regex: Annotated[
        Optional[str],  # noqa: UP045 (typer needs Optional on Python 3.10)
        typer.Option(help="imagefolder: regex with a (?P<patient>...) group on the file name."),
    ] = None,
    patch_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Expected side in pixels [default: idc 50, imagefolder any]."),
    ] = None,
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
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Check every image and write WebDataset shards split by patient into pools.

    Pools (the paper's protocol): gan (what the GAN may see), then the classification pool
    split into train and test. No patient is in two pools. OUT/manifest.json lists every
    shard with its sha256, every pool's patients and class counts, and skipped files.
    """
    from synthbreast.data.ingest import run_ingest

    config = IngestConfig(
        src=str(src),
        out=str(out),
        format=Format(format).value,
        patient_regex=patient_regex,
        patch_size=patch_size,
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
    if dry_run:
        print(dumps(config))
        return
    with progress_bar() as progress:
        manifest = run_ingest(config, progress)
    table = Table(title=f"{out}: {len(manifest['shards'])} shards")
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
Precision = Enum("Precision", {"no": "no", "fp16": "fp16", "bf16": "bf16"}, type=str)
_Opt = Optional  # typer needs Optional[...] on Python 3.10


@app.command("train-gan")
@user_errors
def train_gan(
    shards: Annotated[Path, typer.Argument(help="A folder written by `synthbreast ingest`.")],
    outdir: Annotated[Path, typer.Option(help="Run folders are numbered inside.")] = Path("runs"),
    pool: Annotated[str, typer.Option(help="Pool of the shards to train on.")] = "gan",
    class_label: Annotated[
        _Opt[int], typer.Option("--class", help="Train on one class (the paper: one GAN each).")
    ] = None,
    budget: Annotated[
        _Opt[Budget],
        typer.Option(help="Preset: tiny (seconds), small (CPU minutes), paper (GPU)."),
    ] = None,
    resolution: Annotated[_Opt[int], typer.Option(help="Output side [64].")] = None,
    width: Annotated[_Opt[float], typer.Option(help="Channel multiplier [1.0 = paper].")] = None,
    latent_dim: Annotated[_Opt[int], typer.Option(help="Latent size [512].")] = None,
    g_padding: Annotated[
        _Opt[str], typer.Option(help="Generator conv padding: zeros (paper) or reflect.")
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
    dry_run: Annotated[bool, typer.Option(help="Print the config and stop.")] = False,
) -> None:
    """Train MSG-GAN (WGAN-GP, RMSprop) on a pool of the shards, with accelerate.

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
    config = apply_budget(config, Budget(budget).value if budget else None)
    given = dict(
        resolution=resolution,
        width=width,
        latent_dim=latent_dim,
        g_padding=g_padding,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        kimg=kimg,
        tick_kimg=tick_kimg,
        snapshot_kimg=snapshot_kimg,
        checkpoint_kimg=checkpoint_kimg,
    )
    config = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})
    if dry_run:
        print(dumps(config))
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
    checkpoint: Annotated[
        Path, typer.Option(help="A training run folder (its latest checkpoint) or a ckpt-*.json.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the synthetic shards and manifest.")],
    shards: Annotated[int, typer.Option(help="Total shards of the whole job.")] = 76,
    per_shard: Annotated[int, typer.Option(help="Images per shard.")] = 1000,
    class_label: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--class", help="Class label to write [default: the GAN's class]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Base seed; shard i uses a seed from (seed, i).")] = 0,
    shard_range: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="START:END (end exclusive) to make only those shards."),
    ] = None,
    output_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Resize to this side, e.g. 50 = real IDC [default: model's]."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generator call.")] = 100,
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
        seed=seed,
        shard_range=shard_range,
        output_size=output_size,
        batch_size=batch_size,
    )
    if dry_run:
        print(dumps(config))
        return
    with progress_bar() as progress:
        summary = run_generate(config, progress)
    console.print(
        f"{summary['made']} shards made, {summary['skipped']} already complete, "
        f"{summary['images_per_s']:,.1f} img/s -> {out}"
    )


if __name__ == "__main__":
    app()
