"""The `synthbreast` command line: one command per stage, no logic beyond parsing and printing.

Heavy imports (torch, webdataset) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import functools
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from synthbreast import __version__
from synthbreast.config import DemoDataConfig, IngestConfig, InspectConfig, dumps
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
        summary = write_demo_dataset(config, on_progress=lambda n: progress.advance(task, n))
    console.print(
        f"wrote {patients * per_class * 2} demo patches of {patients} patients to {out} "
        "[yellow](procedural demo data, not real tissue)[/]"
    )
    del summary


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


if __name__ == "__main__":
    app()
