"""`synthbreast generate-singan`: SinGAN models (one per real image) -> synthetic shards.

Stages: read the train-singan OUTDIR's selection and load its first `num_models` complete models
-> choose this process's shards (generate.py's rule: --shard-range, else the Slurm array task's
block, else all; then every WORLD_SIZE-th from RANK) -> open or create OUT's manifest, refusing
another job's -> skip complete shards -> per shard: each model draws its share of the shard
from its own noise stream, PNGs at the real patch size, the shard written atomically and
recorded in the manifest under its lock. Shard names, keys, seeds, the manifest lock and the
writer session are generate.py's, so `inspect`, `fidelity` and `classify` read the result as
any synthetic folder.

Which model: sample i of shard s comes from model (s * per_shard + i) mod K, so all K models
give the same number of images (to within one) and every shard mixes them. Its noise: model m's
samples of shard s are drawn, in fixed batches of `batch_size`, from a CPU generator seeded by
(seed, class, s) and m alone, so any process makes any shard with the same bytes.

Variants: `inject_scale` 0 draws new noise at every scale (new layouts); k > 0 follows the
source image's reconstruction below scale k and draws noise from scale k on (the same layout,
new detail). A variant whose pixels equal its source image's at the output size (possible at
the finest scales) is drawn again from the same stream, and counted in its json (`redrawn`).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from synthbreast import __version__
from synthbreast.config import (
    GenerateSinGANConfig,
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
    write_shard,
)
from synthbreast.errors import UserError
from synthbreast.fileio import read_json, sha256_file
from synthbreast.generate import (
    CONFIG,
    KEY_SCHEME,
    POOL,
    SAMPLE_KEYS,
    encode_png,
    manifest_lock,
    parse_shard_range,
    process_rank,
    record_shard,
    report_temp_files,
    sample_key,
    shard_complete,
    shard_name,
    shard_seed,
    shards_for_process,
    training_provenance,
    writer_session,
)
from synthbreast.progress import console
from synthbreast.train.checkpoint import out_of_space_or_unwritable

MAX_REDRAWS = 8  # a variant equal to its source is drawn again at most this often


def validate(config: GenerateSinGANConfig) -> None:
    for name in ("shards", "per_shard", "batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value!r}: must be a whole number >= 1")
    if config.output_size is not None and config.output_size < 1:
        raise UserError(f"--output-size {config.output_size}: must be at least 1 pixel")
    if config.num_models is not None and config.num_models < 1:
        raise UserError(f"--num-models {config.num_models}: must be at least 1 (or left out)")
    if config.inject_scale < 0:
        raise UserError(f"--inject-scale {config.inject_scale}: 0 (new layouts) or a scale > 0")
    if config.threads is not None and config.threads < 1:
        raise UserError(f"--threads {config.threads}: must be at least 1 (or left out)")
    if config.shard_range is not None:
        parse_shard_range(config.shard_range, config.shards)


# --- the models -------------------------------------------------------------------------------


def load_models(config: GenerateSinGANConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the selection, one entry per model used: G, its model.json, source pixels, sha256)."""
    from synthbreast.train.singan import MODEL_FILE, SELECTION, SOURCE, load_model

    root = Path(config.models)
    path = root / SELECTION
    if not path.is_file():
        raise UserError(
            f"{root} is not a `synthbreast train-singan` --outdir (no {SELECTION}): give the "
            "folder train-singan wrote"
        )
    selection = read_json(path)
    items = selection["images"]
    count = config.num_models or len(items)
    if count > len(items):
        raise UserError(
            f"--num-models {count}: {root} has {len(items)} models; give at most {len(items)}"
        )
    models = []
    for item in items[:count]:
        model_dir = root / item["model_dir"]
        if not (model_dir / MODEL_FILE).is_file():
            fewer = f", or use --num-models {item['index']}" if item["index"] else ""
            raise UserError(
                f"model {item['index']} ({model_dir}) is not trained yet: finish it with "
                f"`synthbreast train-singan --config {root / 'config.json'}` (complete models "
                f"are skipped){fewer}"
            )
        G, info = load_model(model_dir)
        if config.inject_scale >= G.config.num_scales:
            raise UserError(
                f"--inject-scale {config.inject_scale}: model {item['index']} has scales "
                f"0..{G.config.num_scales - 1}"
            )
        source_bytes = (model_dir / SOURCE).read_bytes()
        source = Image.open(io.BytesIO(source_bytes))
        models.append(
            {"G": G, "info": info, "item": item, "source": source,
             "sha256": sha256_file(model_dir / MODEL_FILE), "dir": str(model_dir.resolve())}
        )  # fmt: skip
    return selection, models


def output_side(config: GenerateSinGANConfig, models: list[dict[str, Any]]) -> int:
    """--output-size, else the real patch size: the side of the source images (as the shards
    hold them), which must then agree."""
    if config.output_size is not None:
        return config.output_size
    sides = {max(m["source"].size) for m in models}
    if len(sides) > 1:
        raise UserError(
            f"the source images have sides {sorted(sides)}: give one --output-size for all"
        )
    return sides.pop()


# --- pixels -----------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in about [-1, 1] -> (N, H, W) uint8 (grey) or (N, H, W, 3) (RGB)."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def resized(pixels: np.ndarray, size: int) -> Image.Image:
    """One HxW (grey) or HxWx3 uint8 image at size x size (bicubic, antialiased)."""
    image = Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


def encode(pixels: np.ndarray, size: int) -> bytes:
    """PNG bytes at size x size: generate.py's encoder for RGB, the same steps for grey."""
    if pixels.ndim == 3:
        return encode_png(pixels, size)
    buffer = io.BytesIO()
    resized(pixels, size).save(buffer, format="PNG")
    return buffer.getvalue()


def source_pixels(source: Image.Image, channels: int, size: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    image = source.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image)


# --- one shard ----------------------------------------------------------------------------------


def model_seed(shard_seed_value: int, model: int) -> int:
    digest = hashlib.sha256(f"{shard_seed_value}:model{model}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def shard_samples(
    config: GenerateSinGANConfig, models: list[dict[str, Any]], shard: int, label: int,
    size: int, device: torch.device, on_images=None,
) -> Iterator[Sample]:  # fmt: skip
    """The samples of one shard in index order; each model's in fixed batches of its stream."""
    seed = shard_seed(config.seed, shard, label)
    first = shard * config.per_shard
    owner = [(first + i) % len(models) for i in range(config.per_shard)]
    made: dict[int, tuple[bytes, int, int]] = {}  # index -> (png, model, redraws)
    for m, model in enumerate(models):
        indices = [i for i in range(config.per_shard) if owner[i] == m]
        if not indices:
            continue
        G = model["G"]
        rng = torch.Generator(device="cpu").manual_seed(model_seed(seed, m))
        channels = G.config.channels
        source = source_pixels(model["source"], channels, size)
        for start in range(0, len(indices), config.batch_size):
            batch = indices[start : start + config.batch_size]
            with torch.no_grad():
                images = to_uint8(G.sample(len(batch), rng, config.inject_scale))
            for index, pixels in zip(batch, images, strict=True):
                redraws = 0
                # a variant equal to its source at the output size is no variant: draw again
                while np.array_equal(np.asarray(resized(pixels, size)), source):
                    if redraws == MAX_REDRAWS:
                        raise UserError(
                            f"model {model['item']['index']} ({model['dir']}) gave its source "
                            f"image back {MAX_REDRAWS + 1} times at --inject-scale "
                            f"{config.inject_scale}: use a coarser --inject-scale"
                        )
                    redraws += 1
                    with torch.no_grad():
                        pixels = to_uint8(G.sample(1, rng, config.inject_scale))[0]
                made[index] = (encode(pixels, size), m, redraws)
            if on_images is not None:
                on_images(len(batch))
    for index in range(config.per_shard):
        png, m, redraws = made[index]
        item = models[m]["item"]
        meta = {
            "synthetic": True,
            "patient": "synthetic",
            "pool": POOL,
            "label": label,
            "model_name": "singan",
            "model": m,
            "model_dir": item["model_dir"],
            "model_sha256": models[m]["sha256"],
            "source_key": item["key"],
            "source_shard": item["shard"],
            "source_patient": item["patient"],
            "source_sha256": item["sha256"],
            "inject_scale": config.inject_scale,
            "seed": seed,
            "model_seed": model_seed(seed, m),
            "base_seed": config.seed,
            "shard": shard,
            "index": index,
            "width": size,
            "height": size,
            "redrawn": redraws,
        }
        yield Sample(sample_key(label, shard, index), png, label, meta)


# --- the manifest -------------------------------------------------------------------------------


def job_identity(config, models, label: int, size: int) -> dict[str, Any]:
    """The manifest's "job": the config's identity fields, the models' sha256 values for
    their folder, and what the job settled on (two runs may share an OUT only if these agree)."""
    return identity(
        config,
        inputs={"models": [m["sha256"] for m in models]},
        class_label=label,
        output_size=size,
        key_scheme=KEY_SCHEME,
        model_name="singan",
    )


def new_manifest(config, job, selection, models) -> dict[str, Any]:
    label, total = job["class_label"], config.shards * config.per_shard
    try:
        real = load_manifest(Path(selection["shards"]))
        real_source = real.get("source", {})
    except UserError:
        real_source = {}  # the real shards moved: the selection still names them
    train = {"shards": selection["shards"], "pool": selection["pool"]}
    return {
        "schema": SCHEMA,
        "status": "incomplete",
        "created_by": f"synthbreast {__version__}",
        "config": to_dict(config),
        "job": job,
        "source": {
            "synthetic": True,
            "demo": real_source.get("demo"),
            "real": False,
            "format": "synthetic",
            "class_names": real_source.get("class_names"),
            "patient_level": False,
            "model_name": "singan",
            "models": [
                {
                    "index": m["item"]["index"],
                    "model_dir": m["dir"],
                    "sha256": m["sha256"],
                    "source_key": m["item"]["key"],
                    "source_patient": m["item"]["patient"],
                    "scales": m["G"].config.num_scales,
                    "model": m["info"]["model"],
                }
                for m in models
            ],
            "training_shards": selection["shards"],
            **training_provenance(train),
        },
        "sample": {
            "keys": SAMPLE_KEYS,
            "image_size": job["output_size"],
            "channels": models[0]["G"].config.channels,
        },
        "pools": {
            POOL: {
                "fraction": None,
                "patients": ["synthetic"],
                "images": total,
                "counts": {str(label): total},
                "shards": [shard_name(i) for i in range(config.shards)],
            }
        },
        "shards": [],
        "totals": {"images": total},
        # the MSG-GAN collapse check compares many images with a pool; a SinGAN's reference
        # is its one source image (SiFID)
        "quality": {"checked": False, "why": "SinGAN: one model per image"},
    }


def open_manifest(out: Path, config, job, selection, models) -> dict[str, Any]:
    """Create OUT's manifest, or check the one there is of this same job. Under the lock."""
    if not (out / MANIFEST).is_file():
        strangers = sorted(
            p.name
            for p in out.iterdir()
            if not p.name.startswith(".") and p.name not in (CONFIG, "inspect")
        )
        if strangers:
            raise UserError(
                f"{out} holds files that are not a generate-singan job "
                f"({', '.join(strangers[:5])}): choose an empty or new --out"
            )
        manifest = new_manifest(config, job, selection, models)
        save_manifest(out, manifest)
        return manifest
    manifest = load_manifest(out)
    before = manifest.get("job", {})
    differ = identity_differences(before, job)
    if differ:
        raise UserError(
            f"{out} was generated with another job ({'; '.join(differ)}); shards of two jobs "
            "must not mix: use a new --out (or repeat the first job's options to finish it)"
        )
    return manifest


# --- the job ------------------------------------------------------------------------------------


def run_generate_singan(
    config: GenerateSinGANConfig, progress=None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Make this process's shards of the job; a full disk is one line saying how to resume."""
    resume = "rerun the same `synthbreast generate-singan` command: complete shards are kept"
    with out_of_space_or_unwritable(config.out, resume):
        return _run(config, progress, os.environ if env is None else env)


def _run(config: GenerateSinGANConfig, progress, env: Mapping[str, str]) -> dict[str, Any]:
    from synthbreast.devices import choose_device

    started = time.perf_counter()
    validate(config)
    out = Path(config.out)
    mine = shards_for_process(config, env)
    rank, world = process_rank(env)
    summary = {"made": 0, "skipped": 0, "images": 0, "out": str(out), "shards": mine,
               "rank": rank, "world_size": world}  # fmt: skip
    if not mine:
        console.print("no shard for this process: nothing to make", highlight=False)
        return summary
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = choose_device(config.device)
    selection, models = load_models(config)
    for model in models:
        model["G"].to(device)
    label = int(selection["class_label"])
    size = output_side(config, models)
    job = job_identity(config, models, label, size)

    out.mkdir(parents=True, exist_ok=True)
    with writer_session(out) as temp_files:
        report_temp_files(temp_files, out)
        with manifest_lock(out):
            manifest = open_manifest(out, config, job, selection, models)
            save_config(config, out / CONFIG)
        listed = {s["name"]: s for s in manifest["shards"]}
        todo = [i for i in mine if not shard_complete(out, listed.get(shard_name(i)))]
        task = None
        if progress is not None:
            task = progress.add_task("generating (SinGAN)", total=len(todo) * config.per_shard)
        advance = (lambda n: progress.advance(task, n)) if task is not None else None
        made_by = {"rank": rank, "world_size": world}
        if "SLURM_ARRAY_TASK_ID" in env:  # which array task made it, as generate records
            made_by["slurm_array_task"] = int(env["SLURM_ARRAY_TASK_ID"])
        for shard in todo:

            def record(entry: dict[str, Any]) -> None:
                record_shard(out, config.shards, {"name": entry["name"], "pool": POOL,
                                                  **entry, "made_by": made_by})  # fmt: skip

            samples = shard_samples(config, models, shard, label, size, device, advance)
            write_shard(out / shard_name(shard), samples, before_rename=record)
        with manifest_lock(out):
            status = load_manifest(out)["status"]
    return {**summary, "made": len(todo), "skipped": len(mine) - len(todo),
            "images": len(todo) * config.per_shard, "status": status, "output_size": size,
            "models": len(models), "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
