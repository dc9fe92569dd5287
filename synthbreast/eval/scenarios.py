"""The classification scenarios: an ordered registry, and where each takes its images from.

Order is fixed (a Slurm array index picks a scenario by position, `--task-id I`):

    0  real-real        train: real `train` pool        test: real `test` pool        paper 0.84
    1  synth-synth      train: 70% of the synthetic     test: the other 30%           paper 0.99
    2  real-synth       train: real `train` pool        test: all synthetic           paper 0.81
    3  synth-real       train: all synthetic            test: real `test` pool        paper 0.76
    4  real+synth-real  train: real `train` pool plus   test: real `test` pool        (not in
                        ratio x as many synthetic, per class                            the paper)

Real data is an ingest shard folder (`--real DIR`): its `train` and `test` pools hold disjoint
patients, and neither holds a patient of the `gan` pool. The paper split real images 70/30 at
random, so images of one patient were in both train and test; splitting by patient is more
honest (a model cannot score by recognising a patient's stain), and real-real accuracy is
expected somewhat lower than 0.84 for it.

Synthetic data has no patients. synth-synth splits it 70/30 by a seeded hash of
(seed, shard sha256, sample key): deterministic, independent of shard order and of how many
shards there are. real+synth-real takes, per class, round(ratio x real train images of that
class) synthetic images, those with the smallest hashes (all of them when fewer exist).

`--synthetic DIR` (repeatable) is a `synthbreast generate` output folder (manifest.json with one
pool "synthetic", one class per folder) or a parent folder whose subfolders are such folders.

Only paths, manifests and hashes here: reading images is synthbreast.eval.classify's job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthbreast.data.shards import MANIFEST, load_manifest, pool_shards
from synthbreast.errors import UserError
from synthbreast.fileio import sha256_file

REAL_TRAIN_POOL = "train"
REAL_TEST_POOL = "test"
SYNTHETIC_POOL = "synthetic"  # the pool synthbreast.generate writes
SYNTH_TEST_FRACTION = 0.3  # the paper's 70/30

# How a part of the data picks samples from its shards.
ALL, SPLIT_TRAIN, SPLIT_TEST, PER_CLASS_LIMIT = "all", "split-train", "split-test", "limit"


@dataclass(frozen=True)
class Scenario:
    """A train/test pairing. `train` and `test` name sources: real-train, real-test,
    synth-all, synth-train, synth-test, synth-ratio (per-class limit, see the docstring)."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    paper_accuracy: float | None
    summary: str


_ORDERED = (
    Scenario("real-real", ("real-train",), ("real-test",), 0.84, "train real, test real"),
    Scenario("synth-synth", ("synth-train",), ("synth-test",), 0.99, "synthetic 70/30"),
    Scenario("real-synth", ("real-train",), ("synth-all",), 0.81, "train real, test synthetic"),
    Scenario("synth-real", ("synth-all",), ("real-test",), 0.76, "train synthetic, test real"),
    Scenario(
        "real+synth-real",
        ("real-train", "synth-ratio"),
        ("real-test",),
        None,
        "train real plus synthetic, test real",
    ),
)
SCENARIOS: dict[str, Scenario] = {s.name: s for s in _ORDERED}  # insertion order = task order
ALL_SCENARIOS = "all"


def scenario_names() -> list[str]:
    return list(SCENARIOS)


def resolve_scenario(name: str | None, task_id: int | None) -> tuple[Scenario, int]:
    """(scenario, task id) from a name, an index, or both (which must then agree)."""
    names = scenario_names()
    if name is None and task_id is None:
        raise UserError(f"choose a scenario: --scenario NAME ({', '.join(names)}) or --task-id I")
    if task_id is not None and not 0 <= task_id < len(names):
        raise UserError(
            f"--task-id {task_id} is out of range: scenarios are 0..{len(names) - 1} "
            f"({', '.join(f'{i} {n}' for i, n in enumerate(names))})"
        )
    if name is not None and name not in SCENARIOS:
        raise UserError(f"--scenario {name!r} unknown; choose from {', '.join(names)}")
    if name is not None and task_id is not None and names[task_id] != name:
        raise UserError(
            f"--scenario {name} and --task-id {task_id} ({names[task_id]}) disagree: give one"
        )
    index = task_id if task_id is not None else names.index(name)
    return SCENARIOS[names[index]], index


# --- data plans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    path: Path
    sha256: str  # from the manifest
    count: int
    counts: dict[str, int]
    manifest: str  # the manifest.json listing it, and that file's sha256
    manifest_sha256: str
    image_size: int | None = None  # side in pixels, from the manifest (None: not recorded)


@dataclass(frozen=True)
class Part:
    """Samples from some shards, and the rule that picks which of them to use. The rule sees
    all the part's samples at once (a per-class limit spans every synthetic folder)."""

    kind: str  # "real" | "synthetic"
    shards: tuple[ShardRef, ...]
    select: str = ALL  # ALL | SPLIT_TRAIN | SPLIT_TEST | PER_CLASS_LIMIT
    limit: dict[int, int] = field(default_factory=dict)  # per class, for PER_CLASS_LIMIT
    patient_level: bool = False  # the patient ids are real (not one per image, not "synthetic")
    description: str = ""


@dataclass(frozen=True)
class DataPlan:
    parts: tuple[Part, ...]

    @property
    def description(self) -> str:
        return " + ".join(p.description for p in self.parts)

    @property
    def patient_level(self) -> bool:
        return all(p.kind == "real" and p.patient_level for p in self.parts)

    def manifests(self) -> list[dict[str, str]]:
        seen: dict[str, dict[str, str]] = {}
        for shard in (s for p in self.parts for s in p.shards):
            seen.setdefault(
                shard.manifest, {"path": shard.manifest, "sha256": shard.manifest_sha256}
            )
        return list(seen.values())


@dataclass(frozen=True)
class ScenarioPlan:
    scenario: Scenario
    task_id: int
    train: DataPlan
    test: DataPlan

    def image_sizes(self) -> dict[int | None, list[str]]:
        """Stored image side -> the manifests with it (one key when all images match)."""
        sizes: dict[int | None, list[str]] = {}
        for part in self.train.parts + self.test.parts:
            for shard in part.shards:
                where = sizes.setdefault(shard.image_size, [])
                if shard.manifest not in where:
                    where.append(shard.manifest)
        return sizes


def _refs(root: Path, manifest: dict[str, Any], pool: str) -> tuple[ShardRef, ...]:
    by_name = {s["name"]: s for s in manifest["shards"]}
    listing = root / MANIFEST
    digest = sha256_file(listing)
    size = manifest.get("sample", {}).get("image_size")
    refs = []
    for path in pool_shards(root, manifest, pool):
        entry = by_name[path.name]
        counts = dict(entry["counts"])
        refs.append(
            ShardRef(path, entry["sha256"], entry["count"], counts, str(listing), digest, size)
        )
    return tuple(refs)


def _counts(shards: Sequence[ShardRef]) -> dict[int, int]:
    total: dict[int, int] = {}
    for shard in shards:
        for label, n in shard.counts.items():
            total[int(label)] = total.get(int(label), 0) + n
    return dict(sorted(total.items()))


def load_ingest(root: Path) -> dict[str, Any]:
    """The manifest of a complete `synthbreast ingest` output (--real), or a clear error."""
    manifest = load_manifest(root)
    if manifest["source"].get("synthetic"):
        raise UserError(f"--real {root} holds synthetic shards: give the ingest output folder")
    if manifest.get("status") != "complete":
        raise UserError(
            f"--real {root}: the ingest is not complete (status {manifest.get('status')!r}); "
            "finish it with `synthbreast ingest SRC DIR --resume`"
        )
    return manifest


def load_real(real: str | Path | None, scenario: Scenario) -> tuple[Path, dict[str, Any]]:
    if real is None:
        raise UserError(
            f"scenario {scenario.name} uses real images: pass --real DIR, a shard folder made "
            "by `synthbreast ingest SRC DIR`"
        )
    root = Path(real)
    manifest = load_ingest(root)
    for pool in (REAL_TRAIN_POOL, REAL_TEST_POOL):
        if pool not in manifest["pools"]:
            raise UserError(
                f"--real {root} has no {pool!r} pool (pools: {', '.join(manifest['pools'])}); "
                "ingest it again with `synthbreast ingest` (test fraction > 0)"
            )
    return root, manifest


def synthetic_folders(dirs: Sequence[str | Path], needed_by: str) -> list[Path]:
    """Every generate output folder named by --synthetic: the folder itself or its subfolders.
    `needed_by` says who needs them, for the error when none is given."""
    if not dirs:
        raise UserError(
            f"{needed_by} uses synthetic images: pass --synthetic DIR, a folder "
            "made by `synthbreast generate --checkpoint RUN --out DIR` (or their parent folder)"
        )
    found: list[Path] = []
    for given in map(Path, dirs):
        if not given.is_dir():
            raise UserError(
                f"--synthetic {given}: no such folder (make it with `synthbreast generate`)"
            )
        if (given / MANIFEST).is_file():
            candidates = [given]
        else:
            candidates = sorted(p for p in given.iterdir() if (p / MANIFEST).is_file())
        if not candidates:
            raise UserError(
                f"--synthetic {given}: no manifest.json in it or its subfolders; make one with "
                "`synthbreast generate --checkpoint RUN --out DIR`"
            )
        for folder in candidates:
            if folder.resolve() not in {f.resolve() for f in found}:
                found.append(folder)
    return found


def load_synthetic(folder: Path) -> dict[str, Any]:
    manifest = load_manifest(folder)
    if not manifest["source"].get("synthetic") or SYNTHETIC_POOL not in manifest["pools"]:
        raise UserError(
            f"--synthetic {folder} is not a `synthbreast generate` output (no pool "
            f"{SYNTHETIC_POOL!r}); real shards go to --real"
        )
    if manifest.get("status") != "complete":
        raise UserError(
            f"--synthetic {folder}: generation is not complete (status "
            f"{manifest.get('status')!r}); rerun the same `synthbreast generate` command"
        )
    return manifest


def check_provenance(
    real_root: Path,
    real_manifest: dict[str, Any],
    pools: Sequence[str],
    folder: Path,
    synthetic_manifest: dict[str, Any],
) -> None:
    """Refuse synthetic images whose GAN saw patients of these real pools (the unseen patients a
    result is measured on): they would score the GAN's memory of them, not generalisation.
    The GAN's patients are recorded by `generate` (source.training_patients); sets made before
    that, or imported with `import-synthetic`, record none and are not checked."""
    source = synthetic_manifest.get("source", {})
    seen = set(source.get("training_patients") or [])
    for pool in pools:
        overlap = sorted(seen & set(real_manifest["pools"].get(pool, {}).get("patients", [])))
        if overlap:
            shown = ", ".join(overlap[:3]) + (", ..." if len(overlap) > 3 else "")
            raise UserError(
                f"--synthetic {folder}: its GAN was trained on {len(overlap)} patients of the "
                f"{pool!r} pool of {real_root / MANIFEST} ({shown}), from "
                f"{source.get('training_manifest')} pool {source.get('training_pool')!r}: "
                f"results on that pool would be inflated. Train the GAN on the gan pool of the "
                f"same ingest (`train-gan --pool gan`)"
            )


def plan_scenario(
    scenario: Scenario,
    task_id: int,
    real: str | Path | None,
    synthetic: Sequence[str | Path],
    synth_ratio: float = 1.0,
) -> ScenarioPlan:
    """Which shards, and which samples of them, train and test a scenario (manifests only)."""
    if synth_ratio < 0:
        raise UserError(f"--synth-ratio {synth_ratio} must be >= 0")
    sources = set(scenario.train) | set(scenario.test)
    real_parts: dict[str, Part] = {}
    if any(s.startswith("real") for s in sources):
        root, manifest = load_real(real, scenario)
        patient_level = bool(manifest["source"].get("patient_level"))
        for source, pool in (("real-train", REAL_TRAIN_POOL), ("real-test", REAL_TEST_POOL)):
            info = manifest["pools"][pool]
            text = f"real {pool} pool of {root} ({len(info['patients'])} patients)"
            refs = _refs(root, manifest, pool)
            real_parts[source] = Part("real", refs, patient_level=patient_level, description=text)
    folders: list[Path] = []
    synth_shards: list[ShardRef] = []
    if any(s.startswith("synth") for s in sources):
        folders = synthetic_folders(synthetic, f"scenario {scenario.name}")
        for folder in folders:
            synthetic_manifest = load_synthetic(folder)
            if real_parts:
                check_provenance(root, manifest, [REAL_TEST_POOL], folder, synthetic_manifest)
            synth_shards += _refs(folder, synthetic_manifest, SYNTHETIC_POOL)

    def synthetic_part(select: str, limit: dict[int, int] | None = None) -> Part:
        names = {
            ALL: "all synthetic",
            SPLIT_TRAIN: f"synthetic, the {1 - SYNTH_TEST_FRACTION:.0%} of a seeded hash split",
            SPLIT_TEST: f"synthetic, the {SYNTH_TEST_FRACTION:.0%} of a seeded hash split",
            PER_CLASS_LIMIT: f"synthetic, {synth_ratio:g} x the real train images per class",
        }
        where = ", ".join(str(f) for f in folders)
        text = f"{names[select]} (from {where})"
        return Part("synthetic", tuple(synth_shards), select, dict(limit or {}), description=text)

    def plan_of(names: tuple[str, ...]) -> DataPlan:
        parts: list[Part] = []
        for source in names:
            if source in real_parts:
                parts.append(real_parts[source])
            elif source == "synth-all":
                parts.append(synthetic_part(ALL))
            elif source == "synth-train":
                parts.append(synthetic_part(SPLIT_TRAIN))
            elif source == "synth-test":
                parts.append(synthetic_part(SPLIT_TEST))
            elif source == "synth-ratio":
                real_counts = _counts(real_parts["real-train"].shards)
                limit = {c: round(synth_ratio * n) for c, n in real_counts.items()}
                parts.append(synthetic_part(PER_CLASS_LIMIT, limit))
            else:  # a registry typo, not a user error
                raise ValueError(f"unknown data source {source!r} in scenario {scenario.name}")
        return DataPlan(tuple(parts))

    return ScenarioPlan(scenario, task_id, plan_of(scenario.train), plan_of(scenario.test))


# --- picking samples -------------------------------------------------------------------------


def sample_hash(seed: int, shard_sha256: str, key: str) -> float:
    """A uniform number in [0, 1) from (seed, shard, key) alone: the split of one sample."""
    digest = hashlib.sha256(f"{seed}:{shard_sha256}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def keep_mask(
    part: Part, shard_sha256s: Sequence[str], keys: Sequence[str], labels: Sequence[int], seed: int
) -> list[bool]:
    """Which of a part's samples (given in reading order) the part uses."""
    if part.select == ALL:
        return [True] * len(keys)
    hashes = [sample_hash(seed, s, k) for s, k in zip(shard_sha256s, keys, strict=True)]
    cut = 1 - SYNTH_TEST_FRACTION
    if part.select == SPLIT_TRAIN:
        return [h < cut for h in hashes]
    if part.select == SPLIT_TEST:
        return [h >= cut for h in hashes]
    if part.select == PER_CLASS_LIMIT:
        keep = [False] * len(keys)
        for label, limit in part.limit.items():
            members = [i for i, y in enumerate(labels) if y == label]
            for i in sorted(members, key=lambda i: hashes[i])[:limit]:
                keep[i] = True
        return keep
    raise ValueError(f"unknown selection {part.select!r}")
