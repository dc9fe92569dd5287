"""`synthbreast generate`: a trained generator -> synthetic shards in the real shards' schema.

Stages: load and verify the checkpoint -> choose this process's shards (--shard-range, else the
Slurm array task's block, else all; then every WORLD_SIZE-th from RANK) -> open or create the
manifest, refusing another job's OUT -> skip shards already complete -> per shard: draw its
latents from its own seed, run G_ema in fixed batches, encode PNGs, write the shard atomically and
record it in the manifest under a file lock, so that ranks and array tasks can share one OUT.

Reproducibility: shard i's latents come from a seed derived from (seed, class, i) alone, drawn on
the CPU, and G runs on fixed batches of `batch_size` (the last one shorter) cut from them, so any
process makes any shard with the same bytes. Measured on the 2-core AMD EPYC dev box
(torch 2.14, MSG-GAN widths 0.0625, 0.125 and 1.0, NCHW and channels_last): G's outputs are
bit-identical for 1, 2, 3, 4 and 8 threads and for batches of 64 split 32+32 or 30+34; a batch of
1 differs in the last bits (another kernel path). So the thread count is left alone (torchrun
sets 1 per process, a plain run uses all cores) and `batch_size` is part of the job's identity.
A GPU gives other bits than the CPU; shards of one OUT should come from one kind of device.

`--filter class-probe` keeps only the images that a texture probe fitted on the GAN's own
training pool labels the class they were drawn as (synthbreast/eval/quality.py, ClassFilter):
each shard draws candidates in fixed batches from its own seed until it is full, and records
how many it drew and how many it had to top up from below the probe's threshold.

Keys and seeds name the class (KEY_SCHEME 2): sample keys are `syn-c<class>-<shard>-<index>` and
the seed is derived from (seed, class, shard), so the class-0 and class-1 sets of one job neither
share keys (predictions.csv had duplicates) nor latents. This changes the bytes of every shard
against earlier versions (keys `syn-<shard>-<index>`, seeds from (seed, shard)); `key_scheme` is
part of the job's identity, so an OUT written before is refused rather than mixed.

Restart: a killed run leaves its half-written shard under a hidden temp name; the next run in the
same OUT removes such files when no other generate is writing there (OUT/.writers.lock, held
shared by every live writer) and says how many. A full disk or an unwritable OUT is one line.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from synthbreast import __version__
from synthbreast.config import (
    GenerateConfig,
    identity,
    identity_differences,
    save_config,
    to_dict,
)
from synthbreast.data.shards import (
    MANIFEST,
    SCHEMA,
    Sample,
    load_manifest,
    save_manifest,
    shard_problem,
    write_shard,
)
from synthbreast.errors import UserError
from synthbreast.eval.quality import FILTER_DRAWS, FILTER_THRESHOLD, ClassFilter
from synthbreast.fileio import read_json, sha256_file
from synthbreast.models.registry import LEGACY_MODEL, MODELS, build_config
from synthbreast.progress import console
from synthbreast.results import CONFIG
from synthbreast.train.checkpoint import (
    checkpoint_paths,
    list_checkpoints,
    load_checkpoint,
    out_of_space_or_unwritable,
)

POOL = "synthetic"
LOCK = ".manifest.lock"
WRITERS = ".writers.lock"  # held shared by every live writer of OUT, exclusively to clean
# the temp names our atomic writes use (synthbreast.fileio.temp_name): `.<name>.tmp-<pid>`
TEMP_FILE = re.compile(r"^\.(synthetic-\d{6}\.tar|manifest\.json|config\.json)\.tmp-\d+$")
KEY_SCHEME = 2  # 2: keys and seeds name the class (see the module docstring); absent: 1
# the class names of a GAN whose training shards are no longer readable: it was then an IDC
# model (classes are otherwise the training manifest's, e.g. healthy / benign / malignant)
CLASS_NAMES = ["0", "1"]
SAMPLE_KEYS = ["__key__", "png", "cls", "json"]
QUALITY_IMAGES = 500  # generated images the collapse check compares with the real ones


def shard_name(shard: int) -> str:
    return f"{POOL}-{shard:06d}.tar"


# --- seeds -----------------------------------------------------------------------------


def shard_seed(base_seed: int, shard: int, label: int) -> int:
    """A 63-bit seed from (base seed, class, shard index) alone: no state shared between shards,
    and the classes of one job draw different latents."""
    digest = hashlib.sha256(f"{base_seed}:class{label}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


NOISE_STREAM = 0x5EED  # xor-ed into a shard's seed for its noise generator


def shard_latents(
    base_seed: int, shard: int, label: int, count: int, latent_dim: int
) -> torch.Tensor:
    """The latents of one shard, drawn on the CPU so every device and process gets the same."""
    rng = torch.Generator(device="cpu").manual_seed(shard_seed(base_seed, shard, label))
    return torch.randn(count, latent_dim, generator=rng)


def sample_key(label: int, shard: int, index: int) -> str:
    """`syn-c1-000003-000017`: unique across the classes and shards of a job."""
    return f"syn-c{label}-{shard:06d}-{index:06d}"


# --- who makes which shards --------------------------------------------------------------


def parse_shard_range(text: str, total: int) -> range:
    """'START:END' (end exclusive) -> range, checked against the job's `total` shards."""
    start_text, sep, end_text = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise UserError(
            f"--shard-range {text!r} is not START:END (end exclusive, e.g. 2:3 = shard 2 alone)"
        ) from None
    if not 0 <= start < end:
        raise UserError(
            f"--shard-range {text!r}: need 0 <= START < END (end exclusive; 2:3 = shard 2)"
        )
    if end > total:
        raise UserError(
            f"--shard-range {text!r} goes past the job's {total} shards (0..{total - 1}); "
            "raise --shards or lower END"
        )
    return range(start, end)


def slurm_task(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, count) of this Slurm array task, or None outside a job array: task k of K
    counted from SLURM_ARRAY_TASK_MIN in steps of SLURM_ARRAY_TASK_STEP."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except (KeyError, ValueError) as err:
        raise UserError(
            f"SLURM_ARRAY_TASK_ID is set but the array's size is not readable ({err}); "
            "use --shard-range START:END instead"
        ) from None
    index, rest = divmod(task - first, step)
    if rest or not 0 <= index < count:
        raise UserError(
            f"array task {task} is not in a contiguous array of {count} tasks from {first} "
            "(use --array=0-N, optionally %P), or pass --shard-range"
        )
    return index, count


def slurm_block(total: int, env: Mapping[str, str]) -> range | None:
    """This array task's contiguous block of the shards, or None outside a Slurm job array.

    Task k of K gets shards [total*k//K, total*(k+1)//K): the blocks cover every shard once
    whatever K is.
    """
    found = slurm_task(env)
    if found is None:
        return None
    index, count = found
    return range(total * index // count, total * (index + 1) // count)


def process_rank(env: Mapping[str, str]) -> tuple[int, int]:
    """(rank, world size) from the variables torchrun and `accelerate launch` set; (0, 1) alone.

    Reading the environment is enough: ranks never talk to each other here, they share the
    work by index and meet only in the manifest, under its file lock.
    """
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def process_label(env: Mapping[str, str]) -> str:
    """Which process this is, for log lines: 'array task 3, rank 1 of 2', 'one process'."""
    rank, world = process_rank(env)
    where = f"rank {rank} of {world}" if world > 1 else "one process"
    if "SLURM_ARRAY_TASK_ID" in env:
        where = f"array task {env['SLURM_ARRAY_TASK_ID']}, {where}"
    return where


def shards_for_process(config: GenerateConfig, env: Mapping[str, str]) -> list[int]:
    """The shard indices this process makes: its range or array block, split by rank."""
    if config.shard_range is not None:
        block = parse_shard_range(config.shard_range, config.shards)
    else:
        # an array task whose block is empty (more tasks than shards) makes nothing
        block = slurm_block(config.shards, env)
        if block is None:
            block = range(config.shards)
    rank, world = process_rank(env)
    return list(block)[rank::world]


def default_device(env: Mapping[str, str]) -> torch.device:
    """This process's GPU when there is one (by LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        local = int(env.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return torch.device("cuda", local)
    return torch.device("cpu")


# --- the generator -------------------------------------------------------------------------


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrap names; the weights are the same
    def clean(name: str) -> str:
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix) :]
        return name

    return {clean(k): v for k, v in state_dict.items()}


def choose_snapshot(checkpoint: str | Path, snapshot: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to generate from, and why: `best` (the run's best snapshot by
    quality.SNAPSHOT_RULE, else its latest checkpoint), `latest`, or a step number. A
    ckpt-*.json is taken as it is."""
    from synthbreast.eval.quality import SNAPSHOT_RULE
    from synthbreast.train.checkpoint import resolve_checkpoint
    from synthbreast.train.gan import METRIC_FILE, best_metric_step

    path = Path(checkpoint)
    if path.is_file() or path.suffix in (".json", ".safetensors"):
        return path, {"snapshot": "given", "checkpoint": str(path)}
    run = resolve_checkpoint(path).parent.parent  # a run folder, or an outdir of one run
    if snapshot == "latest":
        return list_checkpoints(run)[-1], {"snapshot": "latest"}
    if snapshot == "best":
        best = best_metric_step(run)
        if best is None:
            return list_checkpoints(run)[-1], {
                "snapshot": "latest",
                "why": f"no {METRIC_FILE} line with a checkpoint in {run}",
            }
        step, line = best
        keys = ("kid", "precision", "recall", "coverage", "diversity", "synth_real_accuracy")
        metric = {k: line.get(k) for k in keys if line.get(k) is not None}
        chosen = {"snapshot": "best", "by": f"{SNAPSHOT_RULE} in {METRIC_FILE}", **metric}
        return checkpoint_paths(run, step)[1], chosen
    if not snapshot.isdigit():
        raise UserError(f"--snapshot {snapshot!r}: give best, latest or a step number")
    wanted = checkpoint_paths(run, int(snapshot))[1]
    if not wanted.is_file():
        steps = ", ".join(str(int(p.stem.split("-")[1])) for p in list_checkpoints(run))
        raise UserError(f"--snapshot {snapshot}: {run} has checkpoints of steps {steps} only")
    return wanted, {"snapshot": "step"}


def load_generator(checkpoint: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """G_ema of a checkpoint (verified by checksum, never unpickled), rebuilt from the model
    name and config the checkpoint records alone, and facts about it."""
    loaded = load_checkpoint(Path(checkpoint))
    json_path = Path(loaded["path"]).resolve()
    state = loaded["state"]
    if not isinstance(state, dict) or "model" not in state or "G_ema" not in state:
        raise UserError(
            f"{json_path} is not a GAN checkpoint (no 'model' and 'G_ema'): "
            "give a run folder of `synthbreast train-gan`"
        )
    name = state.get("model_name", LEGACY_MODEL)  # written before the registry: MSG-GAN
    if name not in MODELS:
        raise UserError(
            f"{json_path} was trained with model {name!r}, which this synthbreast does not "
            f"know (models: {', '.join(MODELS)}): use the synthbreast version that trained it"
        )
    spec = MODELS[name]
    try:
        model_config = build_config(spec, state["model"])
        G = spec.generator(model_config)
        G.load_state_dict(_strip_prefixes(state["G_ema"]))
    except (ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"{json_path}: the generator cannot be rebuilt from it ({err})") from err
    G.eval().requires_grad_(False)
    info = {
        "sha256": read_json(json_path)["sha256"],  # of the .safetensors, checked just now
        "path": str(json_path),
        "step": loaded["step"],
        "kimg": state.get("kimg"),
        "train_config": state.get("config") or {},
        "model_name": name,
        "model": model_config.to_dict(),
    }
    return G, info


def generated_label(config: GenerateConfig, G: torch.nn.Module, checkpoint: dict) -> int:
    """The label the images get: --class for a conditional model (required), else the class
    the model was trained on (a different --class is refused: it would mislabel every image)."""
    trained = checkpoint["train_config"].get("class_label")
    where = checkpoint["path"]
    if G.config.num_classes:
        if config.class_label is None:
            raise UserError(
                f"{where} is a conditional model of {G.config.num_classes} classes: say which "
                f"class to draw with --class 0..{G.config.num_classes - 1}"
            )
        if not 0 <= config.class_label < G.config.num_classes:
            raise UserError(
                f"--class {config.class_label} unknown: {where} draws classes "
                f"0..{G.config.num_classes - 1}"
            )
        return config.class_label
    if trained is None and config.class_label is None:
        raise UserError(
            f"{where} was trained on every class: say which label the images get "
            "with --class N (a class number of its training shards' manifest)"
        )
    if trained is not None and config.class_label not in (None, trained):
        raise UserError(
            f"{where} was trained on class {trained} alone: its images are class {trained}, "
            f"not {config.class_label}; drop --class or give the class-{config.class_label} run"
        )
    return trained if trained is not None else config.class_label


def check_quality(
    G: torch.nn.Module, device: torch.device, checkpoint: dict[str, Any], label: int
) -> dict[str, Any]:
    """The collapse check (synthbreast/eval/quality.py) of this class's images against the
    GAN's own training pool; a note instead where those shards are no longer readable."""
    from synthbreast.data.shards import pool_shards
    from synthbreast.eval.quality import GeneratorQuality

    train = checkpoint["train_config"]
    if not train.get("shards"):
        return {"checked": False, "why": "the checkpoint does not name its training shards"}
    try:
        root = Path(train["shards"])
        paths = pool_shards(root, load_manifest(root), train.get("pool", "gan"))
        reference = None if not G.config.num_classes and train.get("class_label") is None else label
        measure = GeneratorQuality(paths, [reference], QUALITY_IMAGES, G.config.latent_dim)
    except (KeyError, UserError, OSError, ValueError) as err:
        return {"checked": False, "why": f"the GAN's training shards are not readable ({err})"}
    found = measure(G, device)
    return {"checked": True, "features": "texture", "images": QUALITY_IMAGES, **found}


def class_filter(config: GenerateConfig, checkpoint: dict[str, Any]) -> ClassFilter:
    """The probe of `--filter class-probe`, fitted on every class of the GAN's training pool."""
    from synthbreast.data.shards import pool_shards

    train = checkpoint["train_config"]
    classes = range(len(checkpoint["training_source"].get("class_names", CLASS_NAMES)))
    try:
        if not train.get("shards"):
            raise KeyError("the checkpoint does not name them")
        root = Path(train["shards"])
        paths = pool_shards(root, load_manifest(root), train.get("pool", "gan"))
        return ClassFilter(paths, classes)
    except (KeyError, UserError, OSError, ValueError) as err:
        raise UserError(
            f"--filter class-probe needs the GAN's training shards with every class ({err}): "
            "make them readable again, or use --filter none"
        ) from err


def warn_if_collapsed(quality: dict[str, Any], out: Path) -> None:
    from synthbreast.eval.quality import REMEDY

    if not quality.get("collapsed"):
        return
    for label, reasons in quality["collapsed"].items():
        console.print(
            f"[bold red]WARNING: the generator has COLLAPSED (class {label}): "
            f"{'; '.join(reasons)}.[/] The images in {out} are not a synthetic twin of the "
            f"real data and every number computed from them is meaningless. Remedy: {REMEDY}.",
            highlight=False,
            soft_wrap=True,
        )


def training_source(train_config: dict[str, Any]) -> dict[str, Any]:
    """What the GAN's training shards were (demo or real, class names), if still readable."""
    shards = train_config.get("shards")
    if not shards:
        return {}
    try:
        return load_manifest(Path(shards)).get("source", {})
    except (UserError, OSError, ValueError):
        return {}


def training_provenance(train_config: dict[str, Any]) -> dict[str, Any]:
    """Which real patients the GAN saw: its ingest (manifest sha256, split seed), pool and that
    pool's patients, so that classify and fidelity can refuse a test pool it trained on."""
    shards, pool = train_config.get("shards"), train_config.get("pool", "gan")
    try:
        manifest_path = Path(shards) / MANIFEST
        manifest = load_manifest(Path(shards))
        patients = manifest["pools"][pool]["patients"]
    except (TypeError, KeyError, UserError, OSError, ValueError):
        return {"training_pool": pool, "training_patients": None}  # not readable: unchecked
    return {
        "training_pool": pool,
        "training_manifest": str(manifest_path),
        "training_manifest_sha256": sha256_file(manifest_path),
        "training_split_seed": manifest.get("config", {}).get("seed"),
        "training_patients": sorted(patients),
    }


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in about [-1, 1] -> (N, H, W, C) uint8 (C = 3, or 1 for grey)."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def encode_png(pixels: np.ndarray, size: int) -> bytes:
    """One HxWx3 (RGB) or HxWx1 (grey) uint8 image -> RGB or grey PNG bytes, resized (bicubic,
    antialiased) to size x size."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        image = Image.fromarray(pixels[..., 0], "L")  # a 1-channel GAN writes grey PNGs
    else:
        image = Image.fromarray(pixels, "RGB")
    if image.size != (size, size):
        # PIL widens the bicubic kernel when shrinking, so this is antialiased
        image = image.resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_meta(config: GenerateConfig, checkpoint: dict, shard: int, label: int, index: int,
                size: int, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The json member of one generated sample."""
    return {
        "synthetic": True,
        "patient": "synthetic",
        "pool": POOL,
        "label": label,
        "checkpoint": checkpoint["sha256"],
        "checkpoint_path": checkpoint["path"],
        "checkpoint_step": checkpoint["step"],
        "seed": shard_seed(config.seed, shard, label),
        "base_seed": config.seed,
        "shard": shard,
        "index": index,
        "width": size,
        "height": size,
        **extra,
    }


def shard_samples(
    G: torch.nn.Module,
    device: torch.device,
    config: GenerateConfig,
    shard: int,
    label: int,
    size: int,
    checkpoint: dict[str, Any],
    on_images=None,
    keep: ClassFilter | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[Sample]:
    """The samples of one shard, in order; G runs on batches cut at fixed offsets. With
    `keep` (--filter class-probe), those of `_filtered_samples`, its counts put in `stats`."""
    if keep is not None:
        yield from _filtered_samples(G, device, config, shard, label, size, checkpoint, keep,
                                     {} if stats is None else stats, on_images)  # fmt: skip
        return
    latents = shard_latents(config.seed, shard, label, config.per_shard, G.config.latent_dim)
    seed = shard_seed(config.seed, shard, label)
    # the per-pixel noise of a noise-injecting G: its own stream, drawn in the same fixed
    # batches, so a shard's bytes still depend on (seed, class, shard) alone
    noise = torch.Generator(device="cpu").manual_seed(seed ^ NOISE_STREAM)
    for start in range(0, config.per_shard, config.batch_size):
        z = latents[start : start + config.batch_size].to(device)
        labels = torch.full((len(z),), label, device=device) if G.config.num_classes else None
        with torch.no_grad():
            images = G.sample(z, labels, noise)
        for offset, pixels in enumerate(to_uint8(images)):
            index = start + offset
            meta = sample_meta(config, checkpoint, shard, label, index, size)
            yield Sample(sample_key(label, shard, index), encode_png(pixels, size), label, meta)
        if on_images is not None:
            on_images(len(images))


def _filtered_samples(G, device, config, shard, label, size, checkpoint, keep, stats, on_images):
    """`--filter class-probe`: the shard's candidates, drawn in fixed batches from its own
    seed, scored as written (the PNG at its output size); the first `per_shard` the probe
    labels `label` are kept, in the order drawn. After FILTER_DRAWS x per_shard candidates a
    shard still short is topped up with the most probable of the rest, counted in `stats`
    (`below_threshold`) and in the manifest, so a generator the probe disowns still fills its
    shards and says so. Bytes depend on (seed, class, shard, batch size, training pool)."""
    from synthbreast.data.shards import decode_image

    seed = shard_seed(config.seed, shard, label)
    latents = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.Generator(device="cpu").manual_seed(seed ^ NOISE_STREAM)
    limit = FILTER_DRAWS * config.per_shard
    kept: list[tuple[int, float, bytes]] = []  # (candidate, probability, png)
    rest: list[tuple[int, float, bytes]] = []
    drawn = reported = 0
    while len(kept) < config.per_shard and drawn < limit:
        count = min(config.batch_size, limit - drawn)
        z = torch.randn(count, G.config.latent_dim, generator=latents).to(device)
        labels = torch.full((count,), label, device=device) if G.config.num_classes else None
        with torch.no_grad():
            images = G.sample(z, labels, noise)
        pngs = [encode_png(pixels, size) for pixels in to_uint8(images)]
        seen = np.stack([np.asarray(decode_image(png)) for png in pngs])
        for offset, (png, p) in enumerate(zip(pngs, keep.probability(seen, label), strict=True)):
            (kept if p >= FILTER_THRESHOLD else rest).append((drawn + offset, float(p), png))
        if on_images is not None:
            on_images(min(config.per_shard, len(kept)) - reported)
            reported = min(config.per_shard, len(kept))
        drawn += count
    kept = kept[: config.per_shard]
    short = config.per_shard - len(kept)
    if short:
        kept += sorted(rest, key=lambda c: (-c[1], c[0]))[:short]
        kept.sort()
        if on_images is not None:
            on_images(short)
    stats.update(candidates=drawn, below_threshold=short)
    for index, (candidate, p, png) in enumerate(kept):
        meta = sample_meta(config, checkpoint, shard, label, index, size,
                           candidate=candidate, class_probability=round(p, 6))  # fmt: skip
        yield Sample(sample_key(label, shard, index), png, label, meta)


# --- the manifest, shared by every process writing to OUT ----------------------------------


@contextmanager
def manifest_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on OUT/.manifest.lock: one process reads-merges-writes at a time."""
    with open(out / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def job_identity(config: GenerateConfig, checkpoint_sha: str, label: int, size: int) -> dict:
    """What decides the bytes of the shards (the manifest's "job"): two runs may share an OUT
    only if these agree. The config's identity fields (synthbreast/config.py), the checkpoint's
    sha256 for its path, the class and size the job settled on, and the key scheme."""
    return identity(
        config,
        inputs={"checkpoint": checkpoint_sha},
        class_label=label,
        output_size=size,
        key_scheme=KEY_SCHEME,
    )


def new_manifest(
    config: GenerateConfig, job: dict[str, Any], checkpoint: dict[str, Any]
) -> dict[str, Any]:
    source = checkpoint["training_source"]
    label, per_shard = job["class_label"], config.per_shard
    return {
        "schema": SCHEMA,
        "status": "incomplete",
        "created_by": f"synthbreast {__version__}",
        "config": to_dict(config),
        "job": job,
        "source": {
            "synthetic": True,
            "demo": source.get("demo"),  # None: the GAN's training shards were not readable
            "real": False,
            "format": "synthetic",
            "class_names": source.get("class_names", CLASS_NAMES),
            "patient_level": False,
            "checkpoint": checkpoint["sha256"],
            "checkpoint_path": checkpoint["path"],
            "checkpoint_step": checkpoint["step"],
            "checkpoint_kimg": checkpoint["kimg"],
            "snapshot": checkpoint.get("snapshot"),
            "model_name": checkpoint.get("model_name"),
            "model": checkpoint["model"],
            "training_shards": checkpoint["train_config"].get("shards"),
            **checkpoint.get("provenance", {}),
        },
        "sample": {
            "keys": SAMPLE_KEYS,
            "image_size": job["output_size"],
            "channels": checkpoint.get("image_channels", 3),  # 1: grey PNGs
        },
        # planned up front, as ingest does; `shards` below grows as shards land
        "pools": {
            POOL: {
                "fraction": None,
                "patients": ["synthetic"],
                "images": config.shards * per_shard,
                "counts": {str(label): config.shards * per_shard},
                "shards": [shard_name(i) for i in range(config.shards)],
            }
        },
        "shards": [],
        "totals": {"images": config.shards * per_shard},
        # the collapse check of synthbreast/eval/quality.py; `pipeline` and `report` read it
        "quality": checkpoint.get("quality", {"checked": False}),
    }


def _foreign_files(out: Path) -> list[str]:
    ours = {LOCK, CONFIG, "inspect"}
    return sorted(
        p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")
    )


def open_manifest(out: Path, config: GenerateConfig, job: dict, checkpoint: dict) -> dict:
    """Create OUT's manifest, or check that the one there is of this same job. Under the lock."""
    if not (out / MANIFEST).is_file():
        strangers = _foreign_files(out)
        if strangers:
            raise UserError(
                f"{out} holds files that are not a synthbreast generate job "
                f"({', '.join(strangers[:5])}): choose an empty or new --out"
            )
        manifest = new_manifest(config, job, checkpoint)
        save_manifest(out, manifest)
        return manifest
    manifest = load_manifest(out)
    if not manifest.get("source", {}).get("synthetic") or "job" not in manifest:
        raise UserError(f"{out} holds real shards, not synthetic ones: choose a new --out")
    if manifest["job"].get("key_scheme") != job["key_scheme"]:
        raise UserError(
            f"{out} was generated by an earlier synthbreast (key_scheme "
            f"{manifest['job'].get('key_scheme', 1)}: keys syn-<shard>-<index>, latents without "
            f"the class; this one writes key_scheme {job['key_scheme']}): shards of the two must "
            "not mix: use a new --out, or delete that folder to remake it"
        )
    # a job written before --filter existed kept every image it drew
    differ = identity_differences({"filter": "none", **manifest["job"]}, job)
    if differ:
        raise UserError(
            f"{out} was generated with another job ({'; '.join(differ)}); shards of two jobs "
            "must not mix: use a new --out (or repeat the first job's options to finish it)"
        )
    return manifest


def record_shard(out: Path, total: int, entry: dict[str, Any]) -> None:
    """Add or replace one shard's entry: re-read the manifest under the lock, merge, write."""
    with manifest_lock(out):
        manifest = load_manifest(out)
        shards = {s["name"]: s for s in manifest["shards"]}
        shards[entry["name"]] = entry
        manifest["shards"] = [shards[name] for name in sorted(shards)]
        listed = set(shards)
        complete = all(shard_name(i) in listed for i in range(total))
        manifest["status"] = "complete" if complete else "incomplete"
        save_manifest(out, manifest)


def shard_complete(out: Path, entry: dict[str, Any] | None) -> bool:
    """Listed, and the file on disk has the listed size and sha256."""
    return entry is not None and shard_problem(out, entry) is None


# --- the job ---------------------------------------------------------------------------------


FILTERS = ("none", "class-probe")  # which drawn images a shard keeps (GenerateConfig.filter)


def validate(config: GenerateConfig) -> None:
    if config.filter not in FILTERS:
        raise UserError(f"--filter {config.filter!r} unknown; choose from {', '.join(FILTERS)}")
    for name in ("shards", "per_shard", "batch_size"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if config.output_size is not None and config.output_size < 1:
        raise UserError("--output-size must be at least 1 pixel")
    if config.shard_range is not None:
        parse_shard_range(config.shard_range, config.shards)


@contextmanager
def writer_session(out: Path) -> Iterator[dict[str, list[str]]]:
    """Hold OUT/.writers.lock shared while this process writes to OUT. On entry, when no other
    live process holds it (an exclusive lock is granted), remove the temp files killed writers
    left; else leave every temp file alone: it may be a live writer's. Yields the names
    removed and those left."""
    found = {"removed": [], "left": []}
    with open(out / WRITERS, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        for path in sorted(out.iterdir()):
            if TEMP_FILE.match(path.name):
                if alone:
                    path.unlink(missing_ok=True)
                found["removed" if alone else "left"].append(path.name)
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits while another process cleans
        try:
            yield found
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def report_temp_files(found: dict[str, list[str]], out: Path) -> None:
    if found["removed"]:
        names = ", ".join(found["removed"][:3]) + (" ..." if len(found["removed"]) > 3 else "")
        console.print(
            f"removed {len(found['removed'])} stale temp file(s) of a killed generate from {out} "
            f"({names})",
            highlight=False,
            soft_wrap=True,
        )
    if found["left"]:
        console.print(
            f"{len(found['left'])} temp file(s) in {out} left alone: another generate is "
            "writing there",
            highlight=False,
            soft_wrap=True,
        )


def empty_share(config: GenerateConfig, env: Mapping[str, str]) -> str:
    """Why this process has no shard to make (more array tasks or processes than shards)."""
    rank, world = process_rank(env)
    if config.shard_range is not None:
        block = f"--shard-range {config.shard_range}"
    elif "SLURM_ARRAY_TASK_ID" in env:
        block = (
            f"array task {env['SLURM_ARRAY_TASK_ID']}'s block of the job's {config.shards} "
            f"shards over {env.get('SLURM_ARRAY_TASK_COUNT')} tasks"
        )
    else:
        block = f"the job's {config.shards} shards"
    if world > 1:
        return f"{block} leaves no shard for rank {rank} of {world}: nothing to make"
    return f"{block} is empty (more array tasks than shards): nothing to make"


def run_generate(
    config: GenerateConfig, progress=None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Make this process's shards of the job. Returns what it did (see the keys below).
    A full disk or an unwritable OUT is a one-line UserError saying how to resume."""
    resume = "rerun the same `synthbreast generate` command: complete shards are kept"
    with out_of_space_or_unwritable(config.out, resume):
        return _run_generate(config, progress, env)


def _run_generate(
    config: GenerateConfig, progress=None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    started = time.perf_counter()
    env = os.environ if env is None else env
    validate(config)
    out = Path(config.out)

    # What to make: this process's shards; checked before the checkpoint is read. An empty
    # share (more array tasks or ranks than shards) makes nothing and touches nothing.
    mine = shards_for_process(config, env)
    rank, world = process_rank(env)
    summary = {"made": 0, "skipped": 0, "images": 0, "seconds": 0.0, "images_per_s": 0.0,
               "out": str(out), "shards": mine, "rank": rank, "world_size": world}  # fmt: skip
    if not mine:
        console.print(empty_share(config, env), highlight=False, soft_wrap=True)
        status = load_manifest(out)["status"] if (out / MANIFEST).is_file() else "not started"
        total = round(time.perf_counter() - started, 3)
        return {**summary, "total_seconds": total, "device": None, "status": status,
                "nothing_to_make": True, "stale_temp_files_removed": 0}  # fmt: skip

    # The generator (the snapshot asked for) and the job it defines.
    chosen_path, snapshot = choose_snapshot(config.checkpoint, config.snapshot)
    G, checkpoint = load_generator(chosen_path)
    checkpoint["snapshot"] = snapshot
    checkpoint["image_channels"] = getattr(G.config, "image_channels", 3)
    label = generated_label(config, G, checkpoint)
    size = config.output_size or G.config.resolution
    job = job_identity(config, checkpoint["sha256"], label, size)
    checkpoint["training_source"] = training_source(checkpoint["train_config"])
    checkpoint["provenance"] = training_provenance(checkpoint["train_config"])
    class_names = checkpoint["training_source"].get("class_names", CLASS_NAMES)
    if not 0 <= label < len(class_names):
        raise UserError(f"--class {label} unknown: classes are 0..{len(class_names) - 1}")
    device = default_device(env)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # same kernels every run, for the same bits
        torch.backends.cudnn.deterministic = True
    # channels_last: on the CPU, NCHW made nearest upsampling copy every feature map back from
    # oneDNN's layout (27% of G's time); channels_last ran G 1.6x faster (width 0.125, 64 px)
    G.to(device, memory_format=torch.channels_last)

    out.mkdir(parents=True, exist_ok=True)
    with writer_session(out) as temp_files:
        report_temp_files(temp_files, out)
        made, skipped, seconds, status = _make_shards(
            config, env, out, mine, G, device, checkpoint, job, label, size, progress
        )
    images = made * config.per_shard
    return {
        **summary,
        "made": made,
        "skipped": skipped,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": images / seconds if images and seconds > 0 else 0.0,
        "total_seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
        "status": status,
        "stale_temp_files_removed": len(temp_files["removed"]),
    }


def _make_shards(config, env, out, mine, G, device, checkpoint, job, label, size, progress):
    """(made, skipped, seconds, manifest status) of this process's shards, under its writer
    lock: the manifest opened or created, complete shards skipped, the others made."""
    rank, world = process_rank(env)
    # The manifest: created by the first process (with the collapse check), checked by the
    # others; every process repeats the check's verdict.
    with manifest_lock(out):
        if not (out / MANIFEST).is_file():
            checkpoint["quality"] = check_quality(G, device, checkpoint, label)
        manifest = open_manifest(out, config, job, checkpoint)
        save_config(config, out / CONFIG)
    warn_if_collapsed(manifest.get("quality", {}), out)
    listed = {s["name"]: s for s in manifest["shards"]}
    todo = [i for i in mine if not shard_complete(out, listed.get(shard_name(i)))]
    skipped = len(mine) - len(todo)
    if world > 1:
        console.print(
            f"rank {rank}/{world}: shards {mine} ({len(todo)} to make, {skipped} complete)",
            highlight=False,
        )

    # Make each missing shard; it is listed (with its sha256) before it takes its final name.
    made_by = {"rank": rank, "world_size": world, "host": socket.gethostname()}
    if "SLURM_ARRAY_TASK_ID" in env:
        made_by["slurm_array_task"] = int(env["SLURM_ARRAY_TASK_ID"])
    task = None
    if progress is not None:
        what = "generating" if world == 1 else f"generating (rank {rank})"
        task = progress.add_task(what, total=len(todo) * config.per_shard)
    advance = (lambda n: progress.advance(task, n)) if task is not None else None
    keep = class_filter(config, checkpoint) if todo and config.filter == "class-probe" else None
    generating = time.perf_counter()
    short = 0
    for shard in todo:
        stats: dict[str, int] = {}

        def record(entry: dict[str, Any], stats: dict[str, int] = stats) -> None:
            listed_entry = {"name": entry["name"], "pool": POOL, **entry, **stats,
                            "made_by": made_by}  # fmt: skip
            record_shard(out, config.shards, listed_entry)

        samples = shard_samples(
            G, device, config, shard, label, size, checkpoint, advance, keep, stats
        )
        write_shard(out / shard_name(shard), samples, before_rename=record)
        short += stats.get("below_threshold", 0)
    if short:
        console.print(
            f"[bold yellow]--filter class-probe: {short} of {len(todo) * config.per_shard} "
            f"class-{label} images are below the probe's threshold (too few of "
            f"{FILTER_DRAWS} candidates per image were labelled their class): the generator "
            "draws this class poorly[/]",
            highlight=False,
        )
    seconds = time.perf_counter() - generating
    with manifest_lock(out):
        status = load_manifest(out)["status"]
    return len(todo), skipped, seconds, status
