"""`synthbreast inspect`: verify shards against the manifest, count what is in them, draw grids."""

from __future__ import annotations

import json
import random
import shlex
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from synthbreast import config as job_configs
from synthbreast.config import InspectConfig, save_config
from synthbreast.data.layouts import LAYOUTS
from synthbreast.data.shards import (
    decode_image,
    image_bytes,
    iter_shard,
    load_manifest,
    verify_shards,
)
from synthbreast.errors import UserError
from synthbreast.images import make_grid, save_png


@dataclass
class Inspection:
    manifest: dict[str, Any]
    problems: list[str]
    # (pool, class) -> samples, and (pool, patient, class) -> samples, read from the shards
    counts: Counter = field(default_factory=Counter)
    patient_counts: Counter = field(default_factory=Counter)
    count_mismatches: list[str] = field(default_factory=list)
    grids: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.count_mismatches


def _reservoir_add(reservoir: list, item: Any, seen: int, size: int, rng: random.Random) -> None:
    """Keep a uniform random sample of `size` items from a stream (Vitter's algorithm R)."""
    if len(reservoir) < size:
        reservoir.append(item)
    else:
        j = rng.randrange(seen)
        if j < size:
            reservoir[j] = item


def run_inspect(config: InspectConfig, progress=None) -> Inspection:
    root = Path(config.shards)
    manifest = load_manifest(root)
    out = Path(config.out) if config.out else root / "inspect"
    result = Inspection(manifest, verify_shards(root, manifest))
    if not config.count:
        return result
    if result.problems:
        return result  # counting damaged shards would only add noise to the report

    class_names = manifest["source"]["class_names"]
    rng = random.Random(config.seed)
    reservoirs: dict[int, list[bytes]] = {c: [] for c in range(len(class_names))}
    seen: Counter = Counter()
    total = sum(s["count"] for s in manifest["shards"])
    task = progress.add_task("reading shards", total=total) if progress else None
    for shard in manifest["shards"]:
        per_shard: Counter = Counter()
        for sample in iter_shard(root / shard["name"]):
            label = int(sample["cls"])
            meta = json.loads(sample["json"])
            pool = shard["pool"]
            result.counts[(pool, label)] += 1
            result.patient_counts[(pool, meta["patient"], label)] += 1
            per_shard[str(label)] += 1
            seen[label] += 1
            _reservoir_add(
                reservoirs[label], image_bytes(sample), seen[label], config.grid_per_class, rng
            )
            if progress:
                progress.advance(task)
        if dict(per_shard) != shard["counts"]:
            result.count_mismatches.append(
                f"{shard['name']}: read {dict(per_shard)}, manifest says {shard['counts']}"
            )

    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    tag = "DEMO DATA" if manifest["source"].get("demo") else "real data"
    for label, images in reservoirs.items():
        if not images:
            continue
        grid = make_grid(
            [decode_image(b) for b in images],
            title=f"class {class_names[label]} - {len(images)} random patches ({tag})",
            scale=2,
        )
        path = out / f"grid-class{class_names[label]}.png"
        save_png(grid, path)
        result.grids[class_names[label]] = path
    return result


def summary_rows(inspection: Inspection) -> list[tuple[str, str, int, int, int]]:
    """Per pool: (pool, class, images, patients, shards), from what was read."""
    manifest = inspection.manifest
    rows = []
    for pool, info in manifest["pools"].items():
        for label, name in enumerate(manifest["source"]["class_names"]):
            patients = {p for (pl, p, c) in inspection.patient_counts if pl == pool and c == label}
            rows.append(
                (pool, name, inspection.counts[(pool, label)], len(patients), len(info["shards"]))
            )
    return rows


# The command of each job that writes shards: (command, positional fields, options renamed,
# fields left out of the rerun, what the rerun does with the shards already there).
_RERUNS = {
    "IngestConfig": (
        "ingest",
        ("src", "out"),
        {},
        ("workers", "overwrite", "resume"),
        "--resume keeps intact shards and rewrites only damaged or missing ones",
    ),
    "GenerateConfig": (
        "generate",
        (),
        {"class_label": "--class"},
        ("shard_range",),  # the whole job: the part already made is skipped
        "complete shards are kept; missing or damaged ones are made again",
    ),
    "ImportSyntheticConfig": (
        "import-synthetic",
        ("folder",),
        {},
        (),
        "complete class folders are kept; lost shards are made again",
    ),
}


def rerun_command(manifest: dict[str, Any], root: Path) -> tuple[str, str] | None:
    """The command that finishes or mends the folder, from the config its manifest records,
    and what it keeps; None for a job that is not known here."""
    config = dict(manifest.get("config") or {})
    job = config.pop("job", None)
    if job not in _RERUNS or not hasattr(job_configs, job):
        return None
    command, positional, renamed, left_out, keeps = _RERUNS[job]
    defaults = {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in fields(getattr(job_configs, job))
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    source = manifest.get("source", {})
    if job == "IngestConfig":
        config["src"] = source.get("path", config.get("src"))  # resolved: any folder works
        config["out"] = str(root)  # where the shards are now
        layout = LAYOUTS.get(config.get("format"))
        if layout and config.get("patch_size") == layout.default_patch_size:
            config["patch_size"] = None  # the format's default, filled in when it ran
    elif job == "GenerateConfig":
        config["out"] = str(root)
        if source.get("checkpoint_path"):  # the exact checkpoint (sha256 in the manifest)
            config["checkpoint"] = source["checkpoint_path"]
            config["snapshot"] = defaults.get("snapshot")
    words = ["synthbreast", command] + [str(config[name]) for name in positional]
    for name, value in config.items():
        if name in positional or name in left_out or value == defaults.get(name, MISSING):
            continue
        option = renamed.get(name, f"--{name.replace('_', '-')}")
        if isinstance(value, bool):
            words.append(option if value else f"--no-{option[2:]}")
        elif isinstance(value, list):  # e.g. --zoom-levels 1,2,4
            words += [option, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        elif value is not None:
            words += [option, str(value)]
    if job == "IngestConfig":
        words.append("--resume")
    return shlex.join(words), keeps


def require_ok(inspection: Inspection, root: Path) -> None:
    if not inspection.ok:
        lines = inspection.problems + inspection.count_mismatches
        rerun = rerun_command(inspection.manifest, root)
        if rerun:
            fix = f"Finish or mend it with the command that made it: `{rerun[0]}` ({rerun[1]})."
        else:
            fix = "Rerun the job that made it; it rewrites only damaged or missing shards."
        if len(lines) == 1:
            raise UserError(f"{root} failed verification: {lines[0]}. {fix}")
        raise UserError(f"{root} failed verification:\n  " + "\n  ".join(lines) + f"\n{fix}")
