"""Image folder -> WebDataset shards, split by patient into pools, with a manifest.

Stages: scan the layout -> check every image (decode fully, size) -> stop on bad input or skip
and count it -> sample per class -> split patients into pools -> balance -> write shards
atomically, recording each in the manifest as it lands -> mark the manifest complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing
import random
import re
import shlex
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from synthbreast import __version__
from synthbreast.config import IngestConfig, run_only_fields, save_config, to_dict
from synthbreast.data.demo import DEMO_MARKER
from synthbreast.data.layouts import LAYOUTS, Problem, Record, Scan
from synthbreast.data.mammo import (
    CONTEXTS,
    LABEL_MAPS,
    PECTORAL_MODES,
    Extracted,
    Patch,
    PatchSpec,
    extract,
)
from synthbreast.data.shards import (
    MANIFEST,
    SCHEMA,
    Sample,
    load_manifest,
    save_manifest,
    shard_problem,
)
from synthbreast.data.shards import write_shard as write_shard_file
from synthbreast.errors import UserError
from synthbreast.images import SIXTEEN_BIT_MODES, to_8bit
from synthbreast.progress import console
from synthbreast.results import CONFIG

PAD_COLOUR = (255, 255, 255)  # slide background: border patches are padded with white glass
SMALL_POLICIES = ("error", "pad", "drop")
BALANCE_POLICIES = ("none", "undersample")
MAX_LISTED = 50  # bad files listed in an error message (all of them go to the manifest)
MAMMO_PATCH = 224  # side of cut patches when neither --patch-size nor the format gives one
GREY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")

# Config fields that do not change what an ingest writes (so a resume may differ in them).
# SRC is compared by the files found there (names and sizes), OUT is where the job already is.
_RUN_ONLY_FIELDS = run_only_fields(IngestConfig)


@dataclass(frozen=True)
class Checked:
    """A record whose pixels were read: its size, or why it cannot be used."""

    record: Record
    width: int = 0
    height: int = 0
    reason: str | None = None
    detail: str = ""
    mode: str = ""  # PIL's mode: 16-bit grey is converted to 8 bits when written


# --- checking images -------------------------------------------------------------------


def check_image(path: Path, patch_size: int | None) -> tuple[int, int, str | None, str]:
    """Decode one image fully. Returns (width, height, reason, detail); reason None = good.

    Reasons: empty_file, corrupt, truncated, wrong_size (larger or not square-able),
    small (smaller than the patch size in both sides: a slide-border patch).
    """
    return _check_image(path, patch_size)[:4]


def _check_image(path: Path, patch_size: int | None) -> tuple[int, int, str | None, str, str]:
    """check_image, and the image's PIL mode."""
    try:
        if path.stat().st_size == 0:
            return 0, 0, "empty_file", "0 bytes", ""
        with Image.open(path) as img:
            img.load()  # decode every pixel: a truncated file fails here, not at open
            width, height = img.size
            mode = img.mode
    except UnidentifiedImageError:
        return 0, 0, "corrupt", "not a readable image", ""
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err)
        reason = "truncated" if "truncated" in text.lower() else "corrupt"
        return 0, 0, reason, text[:200], ""
    if patch_size is not None and (width, height) != (patch_size, patch_size):
        expected = f"{width}x{height}, expected {patch_size}x{patch_size}"
        if width <= patch_size and height <= patch_size:
            return width, height, "small", expected, mode
        return width, height, "wrong_size", expected, mode
    return width, height, None, "", mode


def _check_one(args: tuple[str, str, int | None]) -> tuple[int, int, str | None, str, str]:
    root, rel, patch_size = args
    return _check_image(Path(root) / rel, patch_size)


def check_records(
    root: Path, records: list[Record], patch_size: int | None, workers: int, progress=None
) -> list[Checked]:
    """Check every record's pixels, in `workers` processes (decoding is the cost of a scan)."""
    jobs = [(str(root), r.path, patch_size) for r in records]
    task = progress.add_task("checking images", total=len(jobs)) if progress else None
    results = []
    if workers > 1 and len(jobs) > 256:
        # spawn, not fork: the caller may hold torch's thread pools, which do not survive fork
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for result in pool.map(_check_one, jobs, chunksize=128):
                results.append(result)
                if progress:
                    progress.advance(task)
    else:
        for job in jobs:
            results.append(_check_one(job))
            if progress:
                progress.advance(task)
    return [Checked(r, *result) for r, result in zip(records, results, strict=True)]


# --- mammograms: cutting patches ---------------------------------------------------------


@dataclass
class Cut:
    """What cutting every mammogram gave: per image a Checked (its size, or why it is bad),
    and the patches as records for the planning below (`path` is the patch's key)."""

    checked: list[Checked]
    records: list[Record]
    patches: dict[str, tuple[Patch, str]]  # patch key -> (patch, source image path)
    unlocated: list[str]  # refs of lesions without a place (no crop; no healthy crop there)
    unmapped: int  # lesions whose pathology the label map leaves out
    healthy_short: int  # healthy patches asked for but not found clear of lesions
    off_breast: list[str]  # lesions whose centre is outside the breast mask (cut all the same)
    normalisation: dict[str, int]  # how pixel values became 8 bits: images per method
    labels: str = ""  # the label map used
    # images searched for the pectoral muscle -> share of the breast found to be muscle (0: none)
    pectoral: dict[str, float] = dataclasses.field(default_factory=dict)


def patch_spec(config: IngestConfig, scan: Scan, labels: str, channels: int) -> PatchSpec:
    """The cutting settings for the worker processes; healthy crops in the bbox context take
    the sides the lesion crops have (drawn from them), so side alone tells no class."""
    context = CONTEXTS[config.context]
    spec = PatchSpec(
        side=config.patch_size,
        context=config.context,
        context_percent=config.context_percent,
        min_crop=config.min_crop,
        zoom_levels=tuple(config.zoom_levels),
        healthy_per_image=config.healthy_per_image,
        healthy_gap=config.healthy_gap,
        min_tissue=config.min_tissue,
        label_map=labels,
        channels=channels,
        seed=config.seed,
        pectoral=config.pectoral,
    )
    sides = []
    for record in scan.records:
        for lesion in record.lesions:
            if lesion.radius is not None and lesion.x is not None:
                sides += context.sides(2 * lesion.radius, spec)
            elif lesion.bbox is not None:
                x0, y0, x1, y1 = lesion.bbox
                sides += context.sides(max(x1 - x0, y1 - y0), spec)
    return dataclasses.replace(spec, healthy_sides=tuple(sorted(sides)))


def _cut_one(args: tuple) -> Extracted:
    root, rel, key, lesions, spec, view = args
    return extract(Path(root), rel, key, lesions, spec, view)


def cut_patches(
    src: Path, scan: Scan, config: IngestConfig, labels: str, channels: int, progress=None
) -> Cut:
    """Decode every mammogram and cut its patches, in `workers` processes."""
    spec = patch_spec(config, scan, labels, channels)
    keys = sample_keys(scan.records)
    jobs = [(str(src), r.path, keys[r.path], r.lesions, spec, r.view) for r in scan.records]
    task = progress.add_task("cutting patches", total=len(jobs)) if progress else None
    results: list[Extracted] = []
    if config.workers > 1 and len(jobs) > 8:
        context = multiprocessing.get_context("spawn")  # as check_records: torch and fork
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
            for result in pool.map(_cut_one, jobs, chunksize=2):
                results.append(result)
                if progress:
                    progress.advance(task)
    else:
        for job in jobs:
            results.append(_cut_one(job))
            if progress:
                progress.advance(task)
    cut = Cut([], [], {}, [], 0, 0, [], {}, labels)
    for record, result in zip(scan.records, results, strict=True):
        cut.checked.append(
            Checked(record, result.width, result.height, result.reason, result.detail, "L")
        )
        if result.reason is not None:
            continue
        cut.unlocated += result.unlocated
        cut.unmapped += result.unmapped
        cut.healthy_short += result.healthy_short
        cut.off_breast += result.off_breast
        if result.pectoral is not None:
            cut.pectoral[record.path] = result.pectoral
        cut.normalisation[result.normalisation] = cut.normalisation.get(result.normalisation, 0) + 1
        for patch in result.patches:
            x, y = patch.centre
            cut.records.append(Record(patch.key, record.patient, patch.label, x, y))
            cut.patches[patch.key] = (patch, record.path)
    return cut


def make_patch_sample(
    patch: Patch, source: str, record: Record, pool: str, side: int, demo: bool
) -> Sample:
    x0, y0, x1, y1 = patch.box
    meta: dict[str, Any] = {
        "patient": record.patient,
        "label": patch.label,
        "x": record.x,
        "y": record.y,
        "path": source,
        "pool": pool,
        "width": side,
        "height": side,
        "demo": demo,
        "kind": patch.kind,
        "box": [x0, y0, x1, y1],  # source pixels from the top-left; may pass the border
        "scale": round(side / (x1 - x0), 6),  # patch pixels per source pixel
    }
    meta["tissue"] = patch.tissue  # share of the crop in the breast mask (healthy: less muscle)
    if patch.lesion is not None:
        meta["lesion"] = patch.lesion
    return Sample(key=patch.key, image=patch.png, label=patch.label, meta=meta)


def patch_summary(cut: Cut, scan: Scan, config: IngestConfig, plan: list) -> dict[str, Any]:
    """The manifest's account of the cutting: settings, counts per kind and class, what could
    not be cut and why, and every written patch's source image, box and scale."""
    names = scan.class_names
    cut_counts: dict[str, Counter] = {"lesion": Counter(), "healthy": Counter()}
    for patch, _ in cut.patches.values():
        cut_counts[patch.kind][names[patch.label]] += 1
    written: dict[str, Counter] = {"lesion": Counter(), "healthy": Counter()}
    listing = []
    for pool, _, records in plan:
        for r in records:
            patch, source = cut.patches[r.path]
            written[patch.kind][names[patch.label]] += 1
            listing.append(
                {
                    "key": patch.key,
                    "source": source,
                    "kind": patch.kind,
                    "label": patch.label,
                    "box": list(patch.box),
                    "scale": round(config.patch_size / patch.crop_side, 6),
                    "pool": pool,
                }
            )
    return {
        "side": config.patch_size,
        "context": config.context,
        "labels": cut.labels,
        "cut": {kind: dict(sorted(c.items())) for kind, c in cut_counts.items()},
        "written": {kind: dict(sorted(c.items())) for kind, c in written.items()},
        "unlocated_lesions": cut.unlocated,
        "unmapped_lesions": cut.unmapped,
        "healthy_short": cut.healthy_short,
        "lesions_off_breast": cut.off_breast,
        "pectoral": {
            "mode": config.pectoral,
            "searched": len(cut.pectoral),
            "found": sorted(path for path, share in cut.pectoral.items() if share > 0),
        },
        "normalisation": cut.normalisation,
        "list": sorted(listing, key=lambda p: p["key"]),
    }


def patch_lines(manifest: dict[str, Any]) -> list[str]:
    """What the cutting gave, for the ingest command to print (empty for patch layouts)."""
    patches = manifest.get("patches")
    if not patches:
        return []
    lines = []
    for kind in ("lesion", "healthy"):
        counts = patches["written"][kind]
        if counts:
            per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
            lines.append(f"{kind} patches: {per_class}")
    notes = [
        (len(manifest["source"].get("absent_images", [])), "images named in the table absent"),
        (len(patches["unlocated_lesions"]), "lesions without coordinates (no crop, no healthy)"),
        (patches["unmapped_lesions"], f"lesions left out by --labels {patches['labels']}"),
        (patches["healthy_short"], "healthy patches not found clear of lesions"),
        (len(patches["lesions_off_breast"]), "lesions centred outside the breast mask"),
    ]
    lines += [f"{n} {what} (listed in manifest.json)" for n, what in notes if n]
    pectoral = patches.get("pectoral", {})
    if pectoral.get("searched"):
        lines.append(
            f"pectoral muscle found in {len(pectoral['found'])} of {pectoral['searched']} "
            "images searched and kept out of their healthy patches (--pectoral)"
        )
    return lines


def channels_from(checked: list[Checked]) -> int:
    """1 when every image is grey (kept grey, not turned into RGB), else 3."""
    return 1 if checked and all(c.mode in GREY_MODES for c in checked) else 3


def grey_png(data: bytes) -> bytes:
    """A colour image as 8-bit grey PNG (--channels 1 on RGB data), as PIL's luma."""
    with Image.open(io.BytesIO(data)) as img:
        converted = to_8bit(img).convert("L")
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue()


# --- planning: sampling, patient split, balancing, shards ------------------------------


def pool_fractions(config: IngestConfig) -> dict[str, float]:
    """The paper's protocol: a GAN pool, then the classification pool split train/test."""
    gan = config.gan_fraction
    fractions = {
        "gan": gan,
        "train": (1 - gan) * (1 - config.test_fraction),
        "test": (1 - gan) * config.test_fraction,
    }
    return {name: f for name, f in fractions.items() if f > 0}


def cap_per_class(records: list[Record], cap: int | None, seed: int) -> list[Record]:
    """Keep at most `cap` images per class, sampled uniformly (the paper used 78,000 of each)."""
    if cap is None:
        return records
    rng = random.Random(f"cap-{seed}")
    kept = []
    for label in sorted({r.label for r in records}):
        members = [r for r in records if r.label == label]
        kept += rng.sample(members, cap) if len(members) > cap else members
    return sorted(kept, key=lambda r: r.path)


def split_patients(
    records: list[Record], fractions: dict[str, float], seed: int, trials: int = 200
) -> dict[str, list[str]]:
    """Assign whole patients to pools so that each pool gets about its share of every class.

    One trial visits the patients in a seeded random order and puts each into the pool
    furthest below its target, measured per class as a share of that class's total (so no
    pool ends up with all of one class). Patients differ a lot in size, so one greedy pass
    can miss the targets by several points: the best of `trials` orders (all derived from
    `seed`) is kept. No patient is ever in two pools.
    """
    per_patient: dict[str, Counter] = {}
    for r in records:
        per_patient.setdefault(r.patient, Counter())[r.label] += 1
    labels = sorted({r.label for r in records})
    totals = {c: sum(p[c] for p in per_patient.values()) for c in labels}
    rng = random.Random(f"split-{seed}")
    best, best_error = None, float("inf")
    for _ in range(trials):
        patients = sorted(per_patient)
        rng.shuffle(patients)
        shares = {name: dict.fromkeys(labels, 0.0) for name in fractions}
        pools: dict[str, list[str]] = {name: [] for name in fractions}
        for patient in patients:
            target = max(
                fractions,
                key=lambda name: sum(fractions[name] - shares[name][c] for c in labels),
            )
            pools[target].append(patient)
            for c in labels:
                shares[target][c] += per_patient[patient][c] / totals[c]
        error = sum((fractions[n] - shares[n][c]) ** 2 for n in fractions for c in labels)
        if any(not members for members in pools.values()):
            error += len(fractions)  # an empty pool is the worst outcome
        if error < best_error:
            best, best_error = pools, error
    return {name: sorted(members) for name, members in best.items()}


def undersample(records: list[Record], seed: int, pool: str) -> list[Record]:
    """Equal classes inside a pool: every class sampled down to the smallest one."""
    by_label: dict[int, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    smallest = min(len(v) for v in by_label.values())
    rng = random.Random(f"balance-{seed}-{pool}")
    kept = [r for members in by_label.values() for r in rng.sample(members, smallest)]
    return sorted(kept, key=lambda r: r.path)


def shard_sizes(n: int, shard_size: int, min_shards: int) -> list[int]:
    """Split n samples into near-equal shards: at most shard_size each, at least min_shards."""
    if n == 0:
        return []
    count = max(-(-n // shard_size), min(min_shards, n))
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


def sample_keys(records: list[Record]) -> dict[str, str]:
    """A stable, unique, dot-free key per record: the file stem when stems are unique."""

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", text)

    stems = {r.path: clean(Path(r.path).stem) for r in records}
    if len(set(stems.values())) == len(stems):
        return stems
    return {r.path: clean(str(Path(r.path).with_suffix(""))) for r in records}


# --- writing ---------------------------------------------------------------------------


def pad_to(data: bytes, size: int) -> bytes:
    """A small border patch pasted top-left onto a white size x size canvas, as PNG."""
    with Image.open(io.BytesIO(data)) as img:
        canvas = Image.new("RGB", (size, size), PAD_COLOUR)
        canvas.paste(to_8bit(img).convert("RGB"), (0, 0))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def eight_bit_png(data: bytes) -> bytes:
    """A 16-bit grey image as an 8-bit grey PNG, its full range scaled (images.to_8bit)."""
    with Image.open(io.BytesIO(data)) as img:
        converted = to_8bit(img)
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue()


def make_sample(
    src: Path,
    checked: Checked,
    key: str,
    pool: str,
    patch_size: int | None,
    demo: bool,
    channels: int = 3,
) -> Sample:
    r = checked.record
    data = (src / r.path).read_bytes()
    ext = Path(r.path).suffix.lower().lstrip(".")
    meta: dict[str, Any] = {
        "patient": r.patient,
        "label": r.label,
        "x": r.x,
        "y": r.y,
        "path": r.path,
        "pool": pool,
        "width": checked.width,
        "height": checked.height,
        "demo": demo,
    }
    if checked.mode in SIXTEEN_BIT_MODES:
        # every reader decodes with PIL, which would clip these at 255: store 8 bits, scaled
        data, ext = eight_bit_png(data), "png"
        meta["converted_from"] = checked.mode
    if checked.reason == "small":
        data, ext = pad_to(data, patch_size), "png"
        meta["padded_from"] = [checked.width, checked.height]
        meta["width"] = meta["height"] = patch_size
    if channels == 1 and (checked.mode not in GREY_MODES or checked.reason == "small"):
        data, ext = grey_png(data), "png"  # asked for with --channels 1 (padding makes RGB)
        meta["converted_from"] = checked.mode
    return Sample(key=key, image=data, label=r.label, meta=meta, ext=ext)


# --- the output folder -----------------------------------------------------------------


def _ours(path: Path) -> bool:
    """Files an ingest writes (and --overwrite may delete)."""
    name = path.name
    return (
        name in (MANIFEST, CONFIG)
        or (name.endswith(".tar") and path.is_file())
        or (name.startswith(".") and ".tmp-" in name)
        or (name == "inspect" and path.is_dir())
    )


def check_output(out: Path, config: IngestConfig) -> str:
    """May this job write to OUT? Returns "new", "overwrite" or "resume"; raises if not.

    Called before any work, so a refusal costs nothing; nothing is deleted here.
    """
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    entries = list(out.iterdir())
    if not entries:
        return "new"
    if config.resume:
        if not (out / MANIFEST).is_file():
            raise UserError(f"{out} has no {MANIFEST} to resume from: use --overwrite")
        return "resume"
    if not config.overwrite:
        raise UserError(
            f"{out} is not empty: pass --overwrite to replace the shards there, or --resume to "
            "finish an interrupted ingest"
        )
    strangers = [p.name for p in entries if not _ours(p)]
    if strangers:
        raise UserError(
            f"{out} holds files that ingest did not write ({', '.join(strangers[:5])}); "
            "refusing to delete them: choose an empty or new OUT"
        )
    return "overwrite"


def clear_output(out: Path) -> None:
    """Delete what an earlier ingest wrote to OUT (check_output made sure that is all)."""
    for path in out.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def source_fingerprint(scan: Scan) -> dict[str, Any]:
    """The files an ingest was made from, by name and size: the same files make the same job
    wherever the folder is and however its path is spelled (sizes, as a copy keeps no mtime)."""
    paths = sorted([r.path for r in scan.records] + [p.path for p in scan.problems])
    lines = "".join(f"{path}\t{scan.sizes.get(path, -1)}\n" for path in paths)
    # tables by content: an edited row (a moved lesion) is another job even at the same size
    lines += "".join(f"{name}\t{digest}\n" for name, digest in sorted(scan.annotations.items()))
    return {"fingerprint": hashlib.sha256(lines.encode()).hexdigest(), "files": len(paths)}


def _data_root(source: dict[str, Any]) -> Path:
    return Path(source["path"]) / (source.get("descended_into") or "")


def _as_option(name: str, value: Any) -> str:
    """A config value as the ingest flag that gives it."""
    option = f"--{name.replace('_', '-')}"
    if isinstance(value, bool) or value is None:
        return option if value else f"without {option}"
    return f"{option} {shlex.quote(str(value))}"


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "unset"}[value]
    return str(value)


def resume_refusal(out: Path, previous: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """Why OUT's ingest is not this job (one line naming each field and the fix), or None."""
    before, now = previous["config"], manifest["config"]
    differ, fixes = [], []
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(IngestConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    for name in dict.fromkeys([*before, *now]):
        if name in _RUN_ONLY_FIELDS or before.get(name) == now.get(name):
            continue
        if name not in before and now.get(name) == defaults.get(name):
            continue  # a field added since that ingest, at the value it then had implicitly
        option = f"--{name.replace('_', '-')}"
        differ.append(f"{option} {_shown(before.get(name))} there, {_shown(now.get(name))} here")
        fixes.append(_as_option(name, before.get(name)))
    then, here = previous["source"], manifest["source"]
    if "fingerprint" in then:  # the files themselves, wherever they are
        if then["fingerprint"] != here["fingerprint"]:
            differ.append(
                f"SRC files differ: {then['files']} files there, {here['files']} here, "
                "or names or sizes changed"
            )
            fixes.append(f"SRC {_data_root(then)} holding the files it had")
    elif _data_root(then) != _data_root(here):  # written before fingerprints: the path
        differ.append(f"SRC {_data_root(then)} there, {_data_root(here)} here (resolved)")
        fixes.append(f"SRC {_data_root(then)}")
    if not differ:
        return None
    return (
        f"{out} holds an ingest with a different config ({'; '.join(differ)}): --resume "
        f"finishes only that job, so rerun with {', '.join(fixes)} to finish it and keep the "
        "intact shards there, or write the new settings to another OUT "
        f"(--overwrite deletes the shards in {out} and starts again)"
    )


# --- the job ---------------------------------------------------------------------------


def validate(config: IngestConfig) -> None:
    if config.format not in LAYOUTS:
        raise UserError(f"--format {config.format!r} unknown; choose from {', '.join(LAYOUTS)}")
    if config.small_patches not in SMALL_POLICIES:
        raise UserError(f"--small-patches must be one of {', '.join(SMALL_POLICIES)}")
    if config.balance not in BALANCE_POLICIES:
        raise UserError(f"--balance must be one of {', '.join(BALANCE_POLICIES)}")
    if not 0 <= config.gan_fraction < 1:
        raise UserError("--gan-fraction must be in [0, 1): the classification pool needs images")
    if not 0 < config.test_fraction < 1:
        raise UserError("--test-fraction must be in (0, 1)")
    if config.shard_size < 1 or config.min_shards < 1 or config.workers < 1:
        raise UserError("--shard-size, --min-shards and --workers must be at least 1")
    if config.max_per_class is not None and config.max_per_class < 1:
        raise UserError("--max-per-class must be at least 1")
    if config.overwrite and config.resume:
        raise UserError("--overwrite and --resume contradict each other: pick one")
    if config.channels not in (None, 1, 3):
        raise UserError(f"--channels {config.channels}: give 1 (grey) or 3 (RGB)")
    if config.labels is not None and config.labels not in LABEL_MAPS:
        raise UserError(f"--labels {config.labels!r} unknown; choose from {', '.join(LABEL_MAPS)}")
    if config.context not in CONTEXTS:
        raise UserError(f"--context {config.context!r} unknown; choose from {', '.join(CONTEXTS)}")
    if config.patch_size is not None and config.patch_size < 8:
        raise UserError(f"--patch-size {config.patch_size}: give at least 8 pixels")
    if config.context_percent < 0:
        raise UserError(f"--context-percent {config.context_percent}: give 0 or more")
    if not config.zoom_levels or any(z <= 0 for z in config.zoom_levels):
        raise UserError(f"--zoom-levels {config.zoom_levels}: give positive numbers, e.g. 1,2,4")
    if config.healthy_per_image < 0 or config.healthy_gap < 0:
        raise UserError("--healthy-per-image and --healthy-gap must be 0 or more")
    if config.pectoral not in PECTORAL_MODES:
        raise UserError(f"--pectoral {config.pectoral!r}: choose {', '.join(PECTORAL_MODES)}")
    if config.min_crop < 0:
        raise UserError(f"--min-crop {config.min_crop}: give a side in pixels >= 0 (0: none)")
    if not 0 < config.min_tissue <= 1:
        raise UserError(f"--min-tissue {config.min_tissue}: give a share in (0, 1]")
    if config.table is not None and "table" not in LAYOUTS[config.format].options:
        raise UserError(f"--table applies to the csv format, not {config.format}")
    src = Path(config.src)
    if not src.is_dir():
        raise UserError(f"source folder {src} does not exist or is not a folder")


def _listing(rows: list[tuple[str, str, str]]) -> list[str]:
    """'  reason  path  (detail)' lines, at most MAX_LISTED of them."""
    lines = [f"  {reason:<16} {path}  ({detail})" for reason, path, detail in rows[:MAX_LISTED]]
    if len(rows) > MAX_LISTED:
        lines.append(f"  ... and {len(rows) - MAX_LISTED} more")
    return lines


def bad_input_message(src: Path, bad: list[Problem], small: list[Checked], config) -> str:
    lines = []
    if len(bad) == 1:
        p = bad[0]
        lines.append(
            f"1 bad input file in {src}: {p.reason} {src / p.path} ({p.detail}); fix or remove "
            "it, or rerun with --skip-bad to skip it (recorded with its reason in manifest.json)"
        )
    elif bad:
        lines.append(f"{len(bad)} bad input file(s) in {src}:")
        lines += _listing([(p.reason, str(src / p.path), p.detail) for p in bad])
        lines.append(
            "Fix or remove these files, or rerun with --skip-bad to skip them "
            "(each skipped file and its reason is recorded in manifest.json)."
        )
    if small:
        size = config.patch_size
        lines.append(f"{len(small)} patch(es) smaller than {size}x{size} (slide borders):")
        lines += _listing([("small", str(src / c.record.path), c.detail) for c in small])
        lines.append(
            "Choose a policy: --small-patches pad (pad with white to full size) "
            "or --small-patches drop (leave them out; counted in manifest.json)."
        )
    return "\n".join(lines)


def run_ingest(config: IngestConfig, progress=None) -> dict[str, Any]:
    """The whole ingest. Returns the final manifest (also written to OUT/manifest.json)."""
    started = time.perf_counter()
    validate(config)
    layout = LAYOUTS[config.format]
    if config.patch_size is None:
        config.patch_size = layout.default_patch_size
    given, out = Path(config.src), Path(config.out)
    mode = check_output(out, config)

    # Find the data (the Kaggle download wraps it in one more folder), scan names and folders
    # (symlinks followed), then read every image's pixels.
    try:
        inner = layout.data_root(given) if layout.data_root else None
        src = given / inner if inner else given
        if inner:
            console.print(
                f"{given} holds no patient folders but one folder of them, {inner}/: "
                f"ingesting {src} (recorded as source.descended_into)",
                highlight=False,
            )
        options = {name: getattr(config, name) for name in layout.options}
        scan: Scan = layout.scan(src, config.patient_regex, **options)
    except ValueError as err:
        raise UserError(str(err)) from err
    if not scan.records and not scan.problems:
        raise UserError(
            f"no images found in {src}; expected the {layout.name} layout: {layout.description}"
        )
    cut = None
    if scan.mammograms:
        # Whole mammograms: cut lesion and healthy patches (data/mammo.py).
        config.patch_size = config.patch_size or MAMMO_PATCH
        # labels and channels filled in here, not in the config: the rerun is the same command
        labels = config.labels or layout.labels
        channels = config.channels or 1
        scan.class_names = list(LABEL_MAPS[labels].class_names)
        cut = cut_patches(src, scan, config, labels, channels, progress)
        checked = cut.checked
    else:
        if config.labels is not None:
            raise UserError(
                f"--labels applies to mammograms (mias, or csv with lesion coordinates); "
                f"{src} holds {layout.name} patches whose classes are their folders or table"
            )
        checked = check_records(src, scan.records, config.patch_size, config.workers, progress)

    # Sort out bad input: stop with the list, or skip and count when asked.
    bad = list(scan.problems) + [
        Problem(c.record.path, c.reason, c.detail)
        for c in checked
        if c.reason not in (None, "small")
    ]
    small = [c for c in checked if c.reason == "small"]
    stop_bad = bad and not config.skip_bad
    stop_small = small and config.small_patches == "error"
    if stop_bad or stop_small:
        raise UserError(
            bad_input_message(src, bad if stop_bad else [], small if stop_small else [], config)
        )
    usable = [c for c in checked if c.reason is None or config.small_patches == "pad"]
    dropped_small = len(small) if config.small_patches == "drop" else 0
    if cut is not None:
        side = config.patch_size
        usable = [Checked(r, side, side, None, "", "L") for r in cut.records]
    else:
        channels = config.channels or layout.channels or channels_from(usable)
    for label, name in enumerate(scan.class_names):
        if not any(c.record.label == label for c in usable):
            raise UserError(
                f"class {name!r} has no usable images in {src}: every class needs images "
                f"(found {len(usable)} usable images of the other classes)"
            )

    # Plan: per-class cap, patient split, balancing, shards.
    by_path = {c.record.path: c for c in usable}
    records = cap_per_class([c.record for c in usable], config.max_per_class, config.seed)
    fractions = pool_fractions(config)
    patients = split_patients(records, fractions, config.seed)
    keys = sample_keys(records)
    demo = (src / DEMO_MARKER).is_file()
    pools: dict[str, Any] = {}
    plan: list[tuple[str, str, list[Record]]] = []  # (pool, shard name, records)
    dropped_balance = 0
    for pool, members in patients.items():
        if not members:
            raise UserError(
                f"pool {pool!r} got no patients ({len({r.patient for r in records})} patients "
                f"for {len(fractions)} pools): use more patients or change the fractions"
            )
        member_set = set(members)
        pool_records = [r for r in records if r.patient in member_set]
        if config.balance == "undersample":
            before = len(pool_records)
            pool_records = undersample(pool_records, config.seed, pool)
            dropped_balance += before - len(pool_records)
        random.Random(f"order-{config.seed}-{pool}").shuffle(pool_records)
        counts = Counter(str(r.label) for r in pool_records)
        missing = [n for c, n in enumerate(scan.class_names) if not counts[str(c)]]
        if missing:
            raise UserError(
                f"pool {pool!r} ({len(members)} patients) has no images of class "
                f"{', '.join(missing)}: too few patients with that class; try another --seed "
                "or other fractions"
            )
        names = []
        start = 0
        for i, n in enumerate(shard_sizes(len(pool_records), config.shard_size, config.min_shards)):
            name = f"{pool}-{i:06d}.tar"
            plan.append((pool, name, pool_records[start : start + n]))
            names.append(name)
            start += n
        pools[pool] = {
            "fraction": round(fractions[pool], 6),
            "patients": members,
            "images": len(pool_records),
            "counts": dict(sorted(counts.items())),
            "shards": names,
        }

    reasons = Counter(p.reason for p in bad)
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "incomplete",
        "created_by": f"synthbreast {__version__}",
        "config": to_dict(config),
        "source": {
            "path": str(given.resolve()),
            "descended_into": inner,
            **source_fingerprint(scan),
            "links": scan.links,
            "format": layout.name,
            "demo": demo,
            "real": not demo,
            "class_names": scan.class_names,
            "patient_level": scan.patient_level,
            "annotations": scan.annotations,
            "absent_images": scan.absent,
        },
        "sample": {
            "keys": ["__key__", "png", "cls", "json"],
            "image_size": config.patch_size,
            "channels": channels,
        },
        "pools": pools,
        "shards": [],
        "skipped": {
            "counts": dict(sorted(reasons.items())),
            "files": [asdict(p) for p in bad],
        },
        "small_patches": {
            "policy": config.small_patches,
            "count": len(small),
            "files": [c.record.path for c in small],
        },
        "dropped": {
            "small": dropped_small,
            "max_per_class": len(usable) - len(records),
            "balance": dropped_balance,
        },
        "ignored_files": scan.ignored,
        **({"patches": patch_summary(cut, scan, config, plan)} if cut is not None else {}),
        "totals": {
            "files_seen": len(scan.records) + len(scan.problems),
            "images": sum(p["images"] for p in pools.values()),
        },
    }

    # Write: config first, then each shard atomically; the manifest grows as shards land.
    done = {}
    if mode == "resume":
        previous = load_manifest(out)
        refusal = resume_refusal(out, previous, manifest)
        if refusal:
            raise UserError(refusal)
        done = {s["name"]: s for s in previous["shards"] if shard_problem(out, s) is None}
        for stale in out.glob(".*.tmp-*"):  # half-written shards of the interrupted run
            stale.unlink()
    elif mode == "overwrite":
        clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG)
    save_manifest(out, manifest)
    task = (
        progress.add_task("writing shards", total=sum(len(rs) for _, _, rs in plan))
        if progress
        else None
    )
    for pool, name, shard_records in plan:

        def record(entry: dict[str, Any], pool: str = pool) -> None:
            manifest["shards"].append({"name": entry["name"], "pool": pool, **_fields(entry)})
            save_manifest(out, manifest)

        if name in done:
            record(done[name])
        elif cut is not None:
            samples = (
                make_patch_sample(*cut.patches[r.path], r, pool, config.patch_size, demo)
                for r in shard_records
            )
            write_shard_file(out / name, samples, before_rename=record)
        else:
            samples = (
                make_sample(
                    src,
                    by_path[r.path],
                    keys[r.path],
                    pool,
                    config.patch_size,
                    demo,
                    channels,
                )
                for r in shard_records
            )
            write_shard_file(out / name, samples, before_rename=record)
        if progress:
            progress.advance(task, len(shard_records))

    manifest["status"] = "complete"
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    manifest["resumed_shards"] = len(done)
    save_manifest(out, manifest)
    return manifest


def _fields(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("count", "counts", "sha256", "bytes")}
