"""`synthbreast import-synthetic`: images made by any generator -> synthetic shards.

A diffusion model, a StyleGAN or another lab's GAN leaves a folder of images; this turns it
into what `synthbreast generate` writes, one folder per class (OUT/class<C>/, as the pipeline
lays out OUT/synthetic), so `classify --synthetic OUT`, `fidelity` and memorisation read the
images unchanged. Labels come from class folders (FOLDER/<class>/...) or a CSV (path,label).

Stages: validate -> check OUT (new, the same import to finish or skip, or refuse) -> list the
inputs and hash every file -> skip when every class folder is complete -> decode every image
fully, check its size -> stop on bad input or skip and count it -> per class: RGB PNG shards
written atomically, each listed in the manifest before it takes its name -> mark complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from synthbreast import __version__
from synthbreast.config import ImportSyntheticConfig, identity_fields, save_config, to_dict
from synthbreast.data.ingest import check_image, shard_sizes
from synthbreast.data.layouts import Problem, _is_image, _walk
from synthbreast.data.shards import (
    MANIFEST,
    SCHEMA,
    Sample,
    load_manifest,
    save_manifest,
    shard_problem,
    verify_shards,
    write_shard,
)
from synthbreast.errors import UserError
from synthbreast.eval.scenarios import SYNTHETIC_POOL, load_ingest
from synthbreast.fileio import read_json, sha256_file
from synthbreast.results import CONFIG

JOB = "ImportSyntheticConfig"  # to_dict's "job" of this config
DEFAULT_CLASS_NAMES = ["0", "1"]  # without --real: IDC negative / positive, as generate's
SAMPLE_KEYS = ["__key__", "png", "cls", "json"]
MAX_LISTED = 50  # bad files listed in an error message (all of them go to the manifest)
# Config fields that decide the bytes of every shard: an OUT holds one import.
IDENTITY_FIELDS = identity_fields(ImportSyntheticConfig)
NOT_CHECKED = {
    "checked": False,
    "why": "imported images: generate's collapse check needs the generator; "
    "`synthbreast fidelity` measures them against the real images",
}


def class_folder(label: int) -> str:
    return f"class{label}"  # as the pipeline names its synthetic folders


def shard_name(shard: int) -> str:
    return f"{SYNTHETIC_POOL}-{shard:06d}.tar"  # as generate names its shards


@dataclass(frozen=True)
class Input:
    """One image file to import: its path relative to FOLDER, its class and its sha256."""

    path: str
    label: int
    sha256: str


@dataclass
class Listing:
    """What FOLDER (and the CSV) hold, before any pixel is read."""

    inputs: list[Input] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # not images (notes, .DS_Store, the CSV)
    unlisted: list[str] = field(default_factory=list)  # images the CSV does not name


# --- the labels: class folders or a CSV --------------------------------------------------------


def list_class_folders(folder: Path, class_names: list[str]) -> Listing:
    """FOLDER/<class>/**/<image>: the first path component is the class name."""
    index = {name: i for i, name in enumerate(class_names)}
    known = ", ".join(class_names)
    listing = Listing()
    for rel in _walk(folder):
        if not _is_image(rel):
            listing.ignored.append(rel)
            continue
        top, sep, _ = rel.partition("/")
        if not sep:
            detail = f"not in a class folder: move it to FOLDER/<class>/ (classes: {known})"
            listing.problems.append(Problem(rel, "no_class", detail))
        elif top not in index:
            detail = f"folder {top!r} is not a class of the real set (classes: {known})"
            listing.problems.append(Problem(rel, "unknown_class", detail))
        else:
            listing.inputs.append(Input(rel, index[top], ""))
    return listing


def read_label_rows(labels: Path) -> list[dict[str, str]]:
    """The CSV's rows; a clear error for a file without path and label columns."""
    try:
        with open(labels, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns or "label" not in columns:
                raise UserError(
                    f"--labels {labels}: needs a header row with columns path,label (found "
                    f"{', '.join(columns) or 'no header'}); path is relative to FOLDER"
                )
            # short rows give None values, long rows a None key: both read as empty
            rows = [
                {k.strip(): (v if isinstance(v, str) else "").strip() for k, v in row.items() if k}
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--labels {labels} is not a readable CSV file ({err})") from err
    if not rows:
        raise UserError(f"--labels {labels} has a header but no rows: nothing to import")
    return rows


def list_csv(folder: Path, labels: Path, class_names: list[str]) -> Listing:
    """Rows path,label of a CSV; path relative to FOLDER (or absolute inside it)."""
    index = {name: i for i, name in enumerate(class_names)}
    known = ", ".join(class_names)
    listing = Listing()
    seen: set[str] = set()
    for number, row in enumerate(read_label_rows(labels), start=2):  # row 1 is the header
        where = f"row {number} of {labels.name}"
        given = row["path"]
        if not given:
            listing.problems.append(Problem(f"<{where}>", "bad_row", "empty path"))
            continue
        rel = os.path.relpath(os.path.normpath(folder / given), folder).replace(os.sep, "/")
        if rel == ".." or rel.startswith("../"):
            detail = f"{where}: not inside FOLDER {folder}"
            listing.problems.append(Problem(given, "outside_folder", detail))
        elif rel in seen:
            listing.problems.append(Problem(rel, "duplicate", f"{where}: named twice"))
        elif not (folder / rel).is_file():
            listing.problems.append(Problem(rel, "missing", f"{where}: no such file"))
        elif not _is_image(rel):
            detail = f"{where}: not a .png, .jpg or .jpeg image"
            listing.problems.append(Problem(rel, "not_image", detail))
        elif row["label"] not in index:
            detail = f"{where}: label {row['label']!r} is not a class of the real set ({known})"
            listing.problems.append(Problem(rel, "bad_label", detail))
        else:
            listing.inputs.append(Input(rel, index[row["label"]], ""))
        seen.add(rel)
    for rel in _walk(folder):
        if rel in seen:
            continue
        (listing.unlisted if _is_image(rel) else listing.ignored).append(rel)
    return listing


def hash_inputs(folder: Path, listing: Listing, progress=None) -> None:
    """Every input's sha256, in place (cheap next to decoding: done before the skip check);
    a file that cannot be read becomes a problem."""
    task = progress.add_task("hashing files", total=len(listing.inputs)) if progress else None
    hashed = []
    for item in listing.inputs:
        try:
            hashed.append(Input(item.path, item.label, sha256_file(folder / item.path)))
        except OSError as err:
            listing.problems.append(Problem(item.path, "unreadable", str(err)[:200]))
        if progress:
            progress.advance(task)
    listing.inputs = hashed


def inputs_digest(listing: Listing) -> str:
    """One sha256 of what was read: every input (path, class, bytes) and every problem."""
    digest = hashlib.sha256()
    for item in sorted(listing.inputs, key=lambda i: i.path):
        digest.update(f"{item.path}\t{item.label}\t{item.sha256}\n".encode())
    for problem in listing.problems:
        digest.update(f"{problem.path}\t{problem.reason}\n".encode())
    return digest.hexdigest()


# --- checking the pixels and the size ----------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    item: Input
    width: int
    height: int


def check_inputs(
    folder: Path, listing: Listing, size: int | None, real_size: int | None, progress=None
) -> tuple[list[Checked], int]:
    """Decode every input fully. Returns the usable ones and their stored side; problems found
    (unreadable, not square, another size than the rest) are added to the listing."""
    task = progress.add_task("checking images", total=len(listing.inputs)) if progress else None
    decoded = []
    for item in listing.inputs:
        width, height, reason, detail = check_image(folder / item.path, None)
        if reason is not None:
            listing.problems.append(Problem(item.path, reason, detail))
        elif width != height:
            detail = f"{width}x{height}: the real patches are square; crop it first"
            listing.problems.append(Problem(item.path, "not_square", detail))
        else:
            decoded.append(Checked(item, width, height))
        if progress:
            progress.advance(task)
    if not decoded:
        return [], size or 0
    # without --size: the side most images have (the first file's on a tie); others are odd
    side = size or Counter(c.width for c in decoded).most_common(1)[0][0]
    if real_size is not None and side != real_size:
        how = f"--size {size}" if size is not None else f"the images are {side}x{side} px"
        raise UserError(
            f"{how}, but the real shards hold {real_size}x{real_size} px patches and classify "
            f"refuses images of two sizes: pass --size {real_size} (bicubic, as `generate "
            "--output-size` resizes), or drop --real to import them at another size"
        )
    if size is not None:
        return decoded, side
    usable = []
    for c in decoded:
        if c.width == side:
            usable.append(c)
        else:
            detail = (
                f"{c.width}x{c.height}, the others are {side}x{side}: pass --size {side} to "
                "resize every image"
            )
            listing.problems.append(Problem(c.item.path, "wrong_size", detail))
    return usable, side


def bad_input_message(folder: Path, problems: list[Problem]) -> str:
    lines = [f"{len(problems)} bad input file(s) in {folder}:"]
    for p in problems[:MAX_LISTED]:
        lines.append(f"  {p.reason:<16} {folder / p.path}  ({p.detail})")
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    lines.append(
        "Fix or remove these files, or rerun with --skip-bad to skip them "
        "(each skipped file and its reason is recorded in manifest.json)."
    )
    return "\n".join(lines)


# --- writing -----------------------------------------------------------------------------------


def encode_png(path: Path, side: int) -> tuple[bytes, str, int]:
    """One image file -> RGB PNG bytes of side x side (bicubic, as generate's encode_png), with
    the source's mode and side."""
    with Image.open(path) as img:
        mode, source_side = img.mode, img.width
        image = img if img.mode == "RGB" else img.convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.BICUBIC)  # antialiased when shrinking
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue(), mode, source_side


def class_samples(
    folder: Path,
    items: list[Checked],
    shard: int,
    side: int,
    generator: str | None,
    advance: Callable[[int], None] | None,
) -> Iterator[Sample]:
    for index, checked in enumerate(items):
        item = checked.item
        data, mode, source_side = encode_png(folder / item.path, side)
        meta = {
            "synthetic": True,
            "imported": True,
            "patient": "synthetic",
            "pool": SYNTHETIC_POOL,
            "label": item.label,
            "path": item.path,  # relative to the imported FOLDER
            "sha256": item.sha256,  # of that file, as it was read
            "generator": generator,
            "shard": shard,
            "index": index,
            "width": side,
            "height": side,
            "source_mode": mode,
            "source_size": source_side,
        }
        yield Sample(f"imp-{shard:06d}-{index:06d}", data, item.label, meta)
        if advance is not None:
            advance(1)


def new_manifest(
    config: ImportSyntheticConfig,
    job: dict[str, Any],
    label: int,
    count: int,
    names: list[str],
    side: int,
    listing: Listing,
    labels_source: dict[str, Any],
    imported: dict[str, Any],
) -> dict[str, Any]:
    """A manifest of generate's layout (pool synthetic, one class) saying where the images
    came from. `skipped` counts the whole import's bad files, whichever class they were."""
    reasons = Counter(p.reason for p in listing.problems)
    return {
        "schema": SCHEMA,
        "status": "incomplete",
        "created_by": f"synthbreast {__version__}",
        "config": to_dict(config),
        "job": job,
        "source": {
            "synthetic": True,
            "imported": True,
            "demo": None,  # what the generator was trained on is not known here
            "real": False,
            "format": "synthetic",
            "class_names": job["class_names"],
            "patient_level": False,
            "importer": f"synthbreast import-synthetic {__version__}",
            "folder": config.folder,
            "labels": labels_source,
            "generator": config.generator,
            "real_shards": config.real,
        },
        "sample": {"keys": SAMPLE_KEYS, "image_size": side},
        "pools": {
            SYNTHETIC_POOL: {
                "fraction": None,
                "patients": ["synthetic"],
                "images": count,
                "counts": {str(label): count},
                "shards": names,
            }
        },
        "shards": [],
        "totals": {"images": count},
        "import": imported,  # every class's counts: this folder is one class of them
        "skipped": {
            "scope": "the whole import (every class)",
            "counts": dict(sorted(reasons.items())),
            "files": [asdict(p) for p in listing.problems],
        },
        "ignored_files": listing.ignored,
        "unlisted_files": listing.unlisted,
        "quality": NOT_CHECKED,
    }


def write_class(
    out: Path,
    config: ImportSyntheticConfig,
    manifest: dict[str, Any],
    items: list[Checked],
    side: int,
    progress=None,
) -> int:
    """Write one class folder, keeping the intact shards of an interrupted run. Returns the
    shards written."""
    done: dict[str, dict[str, Any]] = {}
    if (out / MANIFEST).is_file():
        previous = load_manifest(out)  # of this same job: checked before any work
        done = {s["name"]: s for s in previous["shards"] if shard_problem(out, s) is None}
    for path in out.iterdir() if out.is_dir() else []:
        if path.name.startswith(".") and ".tmp-" in path.name:
            path.unlink()  # half-written shards of an interrupted run
        elif re.fullmatch(rf"{SYNTHETIC_POOL}-\d{{6}}\.tar", path.name) and path.name not in done:
            path.unlink()  # damaged, or listed in a manifest that was lost: made again
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG)
    save_manifest(out, manifest)
    task = progress.add_task(f"writing {out.name}", total=len(items)) if progress else None
    advance = (lambda n: progress.advance(task, n)) if task is not None else None
    written, start = 0, 0
    sizes = shard_sizes(len(items), config.shard_size, 1)
    for shard, n in enumerate(sizes):
        name = shard_name(shard)

        def record(entry: dict[str, Any]) -> None:
            manifest["shards"].append({"name": entry["name"], "pool": SYNTHETIC_POOL, **entry})
            save_manifest(out, manifest)

        if name in done:
            record({k: v for k, v in done[name].items() if k != "pool"})
            if advance is not None:
                advance(n)
        else:
            chunk = items[start : start + n]
            samples = class_samples(
                Path(config.folder), chunk, shard, side, config.generator, advance
            )
            write_shard(out / name, samples, before_rename=record)
            written += 1
        start += n
    manifest["status"] = "complete"
    save_manifest(out, manifest)
    return written


def class_complete(out: Path) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    return not verify_shards(out, load_manifest(out))


# --- the output folder -------------------------------------------------------------------------


def identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in IDENTITY_FIELDS}


def check_output(out: Path, config: ImportSyntheticConfig) -> None:
    """May this import write to OUT? Raises if not; called before any file is read."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    entries = [p for p in out.iterdir() if not (p.name.startswith(".") and ".tmp-" in p.name)]
    if not entries:
        return
    if (out / MANIFEST).is_file():
        raise UserError(
            f"--out {out} is a shard folder itself (it has {MANIFEST}): import-synthetic "
            "writes one folder per class inside --out; choose an empty or new --out"
        )
    strangers = [
        p.name
        for p in entries
        if p.name != CONFIG and not (p.is_dir() and re.fullmatch(r"class\d+", p.name))
    ]
    if strangers or not (out / CONFIG).is_file():
        listed = ", ".join(strangers[:5]) or "no config.json"
        raise UserError(
            f"--out {out} holds files that import-synthetic did not write ({listed}): "
            "choose an empty or new --out"
        )
    try:
        previous = read_json(out / CONFIG)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{out / CONFIG} is not readable JSON ({err}): use a new --out") from err
    if not isinstance(previous, dict) or previous.get("job") != JOB:
        job = previous.get("job") if isinstance(previous, dict) else None
        raise UserError(
            f"--out {out} holds the config.json of another job ({job!r}): use a new --out"
        )
    refuse_other_job(out, identity(previous), identity(to_dict(config)))


def refuse_other_job(where: Path, there: dict[str, Any], now: dict[str, Any]) -> None:
    differ = [f"{k} {there.get(k)!r} there, {now[k]!r} now" for k in now if there.get(k) != now[k]]
    if differ:
        hint = ""
        if any(k == "inputs_sha256" for k in now if there.get(k) != now[k]):
            hint = " (the images or labels in FOLDER changed since)"
        raise UserError(
            f"{where} was imported from other inputs or options ({'; '.join(differ)}){hint}; "
            "shards of two imports must not mix: use a new --out (or repeat the first "
            "import's options to finish it)"
        )


# --- the job -----------------------------------------------------------------------------------


def validate(config: ImportSyntheticConfig) -> None:
    """Check the flags and make every path absolute (the identity of the job compares them)."""
    folder = Path(config.folder)
    if not folder.is_dir():
        raise UserError(f"FOLDER {folder} does not exist or is not a folder of images")
    if config.size is not None and config.size < 1:
        raise UserError("--size must be at least 1 pixel")
    if config.shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    if config.labels is not None and not Path(config.labels).is_file():
        raise UserError(f"--labels {config.labels}: no such file (a CSV with columns path,label)")
    config.folder = str(folder.resolve())
    config.out = str(Path(config.out).resolve())
    if Path(config.out) == folder.resolve() or folder.resolve() in Path(config.out).parents:
        raise UserError(f"--out {config.out} is inside FOLDER: choose a folder outside it")
    for name in ("labels", "real"):
        if getattr(config, name) is not None:
            setattr(config, name, str(Path(getattr(config, name)).resolve()))


def run_import(config: ImportSyntheticConfig, progress=None) -> dict[str, Any]:
    """The whole import. Returns what it did (see the keys at the end)."""
    started = time.perf_counter()
    validate(config)
    folder, out = Path(config.folder), Path(config.out)
    class_names, real_size = list(DEFAULT_CLASS_NAMES), None
    if config.real is not None:
        real = load_ingest(Path(config.real))
        class_names = list(real["source"]["class_names"])
        real_size = real.get("sample", {}).get("image_size")
    check_output(out, config)

    # List the inputs and hash them: the job's identity, checked against OUT's class folders.
    if config.labels is None:
        listing = list_class_folders(folder, class_names)
        labels_source: dict[str, Any] = {"from": "class folders", "path": None, "sha256": None}
    else:
        listing = list_csv(folder, Path(config.labels), class_names)
        labels_sha = sha256_file(Path(config.labels))
        labels_source = {"from": "csv", "path": config.labels, "sha256": labels_sha}
    if not listing.inputs and not listing.problems:
        raise UserError(
            f"no images found in {folder}: expected FOLDER/<class>/<image>.png|jpg "
            f"(classes: {', '.join(class_names)}) or --labels FILE.csv with columns path,label"
        )
    hash_inputs(folder, listing, progress)
    job = {
        **identity(to_dict(config)),
        "class_names": class_names,
        "labels_sha256": labels_source["sha256"],
        "inputs_sha256": inputs_digest(listing),
    }
    labels = sorted({item.label for item in listing.inputs})
    for label in range(len(class_names)):
        there = out / class_folder(label)
        if (there / MANIFEST).is_file():
            refuse_other_job(there, load_manifest(there).get("job") or {}, job)
    if labels and all(class_complete(out / class_folder(label)) for label in labels):
        return summary(out, class_names, {}, started, skipped_all=True)

    # Decode every image; stop on bad input unless --skip-bad.
    files_seen = len(listing.inputs) + len(listing.problems)
    usable, side = check_inputs(folder, listing, config.size, real_size, progress)
    if listing.problems and not config.skip_bad:
        raise UserError(bad_input_message(folder, listing.problems))
    if not usable:
        raise UserError(f"no usable images in {folder} ({len(listing.problems)} bad files)")

    # Write: the config first, then per class its shards; each manifest grows as shards land.
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG)
    made: dict[int, int] = {}
    counts = Counter(str(c.item.label) for c in usable)
    imported = {
        "files_seen": files_seen,
        "images": len(usable),
        "counts": dict(sorted(counts.items())),
        "skipped": len(listing.problems),
        "unlisted": len(listing.unlisted),
    }
    for label in sorted({c.item.label for c in usable}):
        where = out / class_folder(label)
        if class_complete(where):
            continue
        items = sorted((c for c in usable if c.item.label == label), key=lambda c: c.item.path)
        names = [shard_name(i) for i in range(len(shard_sizes(len(items), config.shard_size, 1)))]
        manifest = new_manifest(
            config, job, label, len(items), names, side, listing, labels_source, imported
        )
        made[label] = write_class(where, config, manifest, items, side, progress)
    return summary(out, class_names, made, started)


def summary(
    out: Path,
    class_names: list[str],
    made: dict[int, int],
    started: float,
    skipped_all: bool = False,
) -> dict[str, Any]:
    """What OUT holds now, from its class manifests (the import's facts are in each)."""
    classes: dict[int, dict[str, Any]] = {}
    side, skipped, unlisted = None, {}, 0
    for where in sorted(out.glob("class*"), key=lambda p: p.name):
        if not re.fullmatch(r"class\d+", where.name) or not (where / MANIFEST).is_file():
            continue
        manifest = load_manifest(where)
        label = int(where.name.removeprefix("class"))
        classes[label] = {
            "folder": str(where),
            "name": class_names[label] if label < len(class_names) else str(label),
            "images": manifest["totals"]["images"],
            "shards": len(manifest["shards"]),
            "written": made.get(label, 0),
            "status": manifest["status"],
        }
        side = manifest["sample"]["image_size"]
        skipped = manifest.get("skipped", {}).get("counts", {})
        unlisted = len(manifest.get("unlisted_files", []))
    return {
        "out": str(out),
        "complete_already": skipped_all,
        "classes": classes,
        "image_size": side,
        "skipped": skipped,
        "unlisted": unlisted,
        "seconds": round(time.perf_counter() - started, 3),
    }
