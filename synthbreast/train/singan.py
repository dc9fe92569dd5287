"""SinGAN training: one model per image, scale by scale, each scale resumable mid-way.

Stages of `train_singan` (the job): check the options -> read the pool's images of the class
and choose `images` of them by seed (OUTDIR/selection.json, the same list in every process) ->
OUTDIR/config.json -> the models to train (all, or `task_id`'s alone) -> each one in its own
process, in turn (`train_one_model` there), so one that fails leaves the others and is rerun
alone; a complete model (its model.json) is skipped.

Stages of `train_model` (one image): the image at every scale -> for each scale from the first
one not finished: build G_n and D_n (from the previous scale's weights when widths match, as
the official code does), the reconstruction input and the noise amplitude, then
`iterations` x (d_steps critic steps with WGAN-GP, g_steps generator steps with the adversarial
and the reconstruction loss) -> scales/scale-NN.{safetensors,json} -> model.json and a grid.

Restart: every `checkpoint_every` iterations the current scale's whole state (G_n, D_n, both
Adam states, the noise generator's state, the iteration) is a checkpoint (train/checkpoint.py:
safetensors + JSON, atomic, never pickle). A finished scale is its own pair of files. A rerun
loads the finished scales and the latest checkpoint of the next one and goes on from its
iteration; the weights it ends with are those of a run never interrupted (tests/test_singan.py).
Every random draw of training comes from one CPU torch.Generator whose state is checkpointed;
weights are initialised under a seed of (seed, scale); the learning rate is a function of the
iteration alone. SIGTERM / SIGUSR1 (Slurm's warning) checkpoint the scale and exit 143.

Settings (the paper: Adam 5e-4, betas 0.5/0.999, 2,000 iterations per scale with the rate
x0.1 at 1,600, 3+3 steps, reconstruction weight 10, gradient penalty 0.1, noise amplitude 0.1 x
the RMSE of the upsampled coarser reconstruction). The gradient penalty is losses.py's: one
norm of the gradient over the whole image; the official code takes the norm over channels per
pixel, then the mean. The generator steps draw a new fake each step; the official code reuses
the last critic step's fake (computed with G's weights before its first step).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from synthbreast.config import (
    TrainSinGANConfig,
    identity,
    identity_differences,
    save_config,
    to_dict,
)
from synthbreast.data.shards import (
    decode_image,
    image_bytes,
    iter_shard,
    load_manifest,
    manifest_channels,
    verify_pool,
)
from synthbreast.errors import UserError
from synthbreast.fileio import atomic_write_json, fsync_dir, read_json, sha256_file, temp_name
from synthbreast.images import make_grid, save_png
from synthbreast.models.registry import get_model
from synthbreast.models.singan import (
    SinGAN,
    SinGANConfig,
    build_discriminators,
    image_pyramid,
    init_weights,
    upsample,
)
from synthbreast.options import is_int, is_number, option_name
from synthbreast.options import refuse as refuse_option
from synthbreast.progress import console
from synthbreast.results import CONFIG
from synthbreast.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    out_of_space_or_unwritable,
    remove_stale_temp_files,
    save_checkpoint,
)
from synthbreast.train.losses import discriminator_loss, requires_grad

MODEL = "singan"  # synthbreast/models/registry.py
SELECTION = "selection.json"
MODELS_DIR = "models"
MODEL_FILE = "model.json"  # written last: a model folder with it is complete
SOURCE = "source.png"  # the selected sample's image bytes, as the shard holds them
SCALES_DIR = "scales"
GRID = "samples.png"
STOPPED = 143  # exit status after a SIGTERM/SIGUSR1 checkpoint (128 + SIGTERM)

# Budgets: tiny for tests (a 32-64 px image, 2-3 scales, seconds); small for a CPU (a 128 px
# patch, 7 scales; measured in bench/singan_speed.py and the README); paper = the official
# settings (250 px longer side, 2,000 iterations per scale), for a GPU.
BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": dict(max_size=48, min_size=16, scale_factor_init=0.5, nfc=8, max_nfc=8, layers=3,
                 iterations=40, d_steps=1, g_steps=1, lr=2e-3, checkpoint_every=10),
    "small": dict(max_size=128, min_size=25, scale_factor_init=0.75, nfc=16, max_nfc=16,
                  layers=5, iterations=300, d_steps=2, g_steps=2, lr=5e-4,
                  checkpoint_every=50),
    "paper": dict(max_size=250, min_size=25, scale_factor_init=0.75, nfc=32, max_nfc=128,
                  layers=5, iterations=2000, d_steps=3, g_steps=3, lr=5e-4,
                  checkpoint_every=250),
}  # fmt: skip


def apply_budget(config: TrainSinGANConfig, budget: str | None) -> TrainSinGANConfig:
    if budget is None:
        return config
    if budget not in BUDGETS:
        raise UserError(f"--budget {budget!r} unknown; choose from {', '.join(BUDGETS)}")
    return replace(config, budget=budget, **BUDGETS[budget])


# --- options --------------------------------------------------------------------------------

AT_LEAST_ONE = ("images", "iterations", "d_steps", "g_steps", "checkpoint_every", "nfc",
                "max_nfc", "max_size")  # fmt: skip
ABOVE_ZERO = ("lr",)
ZERO_OR_MORE = ("rec_weight", "gp_weight", "noise_amp_init")


def validate(config: TrainSinGANConfig) -> None:
    """Every option checked before any folder is made: one line naming the first bad one."""

    def refuse(field: str, allowed: str) -> None:
        refuse_option(config, field, allowed)

    get_model(config.model, trainer="singan")
    if config.class_label is None:
        raise UserError("--class is required: the class whose images get a SinGAN each")
    if not is_int(config.class_label) or config.class_label < 0:
        refuse("class_label", "must be a class number >= 0 (see the manifest's class_names)")
    for name in AT_LEAST_ONE:
        if not is_int(getattr(config, name)) or getattr(config, name) < 1:
            refuse(name, "must be a whole number >= 1")
    for name in ABOVE_ZERO:
        if not is_number(getattr(config, name)) or getattr(config, name) <= 0:
            refuse(name, "must be a number > 0")
    for name in ZERO_OR_MORE:
        if not is_number(getattr(config, name)) or getattr(config, name) < 0:
            refuse(name, "must be a number >= 0")
    if not is_int(config.layers) or config.layers < 2:
        refuse("layers", "must be a whole number >= 2")
    if not is_int(config.min_size) or config.min_size <= 2 * config.layers:
        refuse("min_size", f"must be more than 2 x --layers ({2 * config.layers} px)")
    if config.max_size < config.min_size:
        refuse("max_size", f"must be at least --min-size ({config.min_size})")
    sf = config.scale_factor_init
    if not is_number(sf) or not 0 < sf < 1:
        refuse("scale_factor_init", "must be a number between 0 and 1 (the paper: 0.75)")
    if not is_number(config.lr_drop) or not 0 < config.lr_drop <= 1:
        refuse("lr_drop", "must be a share of the iterations in (0, 1] (the paper: 0.8)")
    if not is_int(config.seed):
        refuse("seed", "must be a whole number")
    if config.task_id is not None and (
        not is_int(config.task_id) or not 0 <= config.task_id < config.images
    ):
        refuse("task_id", f"must be a model index 0..{config.images - 1} (--images)")
    if config.threads is not None and (not is_int(config.threads) or config.threads < 1):
        refuse("threads", "must be a whole number >= 1 (or left out: torch's default)")
    if config.device not in ("auto", "cpu") and not str(config.device).startswith("cuda"):
        refuse("device", "must be auto, cpu, cuda or cuda:N")


# --- which images ---------------------------------------------------------------------------


def pool_fingerprint(manifest: dict[str, Any], pool: str) -> str:
    """One sha256 over the pool's shard names and checksums: the same images wherever the
    folder is (as train/gan.py's training_inputs)."""
    import hashlib

    listed = sorted((s["name"], s["sha256"]) for s in manifest["shards"] if s["pool"] == pool)
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def choose_images(config: TrainSinGANConfig) -> dict[str, Any]:
    """The selection: `images` samples of class `class_label` in the pool, a seeded choice
    among them sorted by key (so the choice depends on the pool's content and seed alone)."""
    shards = Path(config.shards)
    manifest = load_manifest(shards)
    paths = verify_pool(shards, manifest, config.pool)
    classes = manifest["source"].get("class_names", [])
    if not config.class_label < len(classes):
        raise UserError(
            f"--class {config.class_label} unknown: {shards} has classes 0..{len(classes) - 1} "
            f"({', '.join(classes)})"
        )
    found = []
    for path in paths:
        for sample in iter_shard(path):
            if int(sample["cls"]) != config.class_label:
                continue
            meta = json.loads(sample["json"])
            found.append(
                {
                    "key": sample["__key__"],
                    "shard": path.name,
                    "patient": str(meta.get("patient", "")),
                    "sha256": _sha256(image_bytes(sample)),
                }
            )
    if len(found) < config.images:
        raise UserError(
            f"pool {config.pool!r} of {shards} has {len(found)} images of class "
            f"{config.class_label}: lower --images to at most {len(found)}"
        )
    found.sort(key=lambda s: s["key"])
    chosen = random.Random(f"singan-{config.seed}").sample(found, config.images)
    for index, item in enumerate(chosen):
        item["index"] = index
        item["model_dir"] = f"{MODELS_DIR}/{model_folder_name(index, item['key'])}"
    return {
        "shards": str(shards.resolve()),
        "pool": config.pool,
        "pool_sha256": pool_fingerprint(manifest, config.pool),
        "class_label": config.class_label,
        "class_name": classes[config.class_label],
        "channels": manifest_channels(manifest),
        "patch_size": manifest.get("sample", {}).get("image_size"),
        "seed": config.seed,
        "candidates": len(found),
        "images": chosen,
    }


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def model_folder_name(index: int, key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", key)[:80]
    return f"{index:03d}-{safe}"


def read_source(shards: Path, item: dict[str, Any]) -> bytes:
    """The selected sample's image bytes, checked against the selection's sha256."""
    for sample in iter_shard(Path(shards) / item["shard"]):
        if sample["__key__"] == item["key"]:
            data = image_bytes(sample)
            if _sha256(data) != item["sha256"]:
                break
            return data
    raise UserError(
        f"{Path(shards) / item['shard']} no longer holds sample {item['key']} as selected: "
        "the shards changed since; use a new --outdir"
    )


def image_tensor(data: bytes, channels: int) -> torch.Tensor:
    """Image bytes -> (1, C, H, W) float in [-1, 1]."""
    pixels = np.array(decode_image(data, channels), dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].div(127.5).sub(1.0).contiguous()


# --- one model --------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM / SIGUSR1 -> finish the step, checkpoint, exit 143 (Slurm requeues)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingStopped(Exception):
    """A stop signal came: the scale is checkpointed; the same command resumes it."""


def model_config(config: TrainSinGANConfig, image: torch.Tensor) -> SinGANConfig:
    _, channels, height, width = image.shape
    try:
        return SinGANConfig.for_image(
            height, width, channels, min_size=config.min_size, max_size=config.max_size,
            scale_factor_init=config.scale_factor_init, nfc=config.nfc,
            max_nfc=config.max_nfc, layers=config.layers,
        )  # fmt: skip
    except ValueError as err:
        raise UserError(f"SinGAN settings for a {height}x{width} image: {err}") from None


def scale_paths(model_dir: Path, scale: int) -> tuple[Path, Path]:
    folder = Path(model_dir) / SCALES_DIR
    return folder / f"scale-{scale:02d}.safetensors", folder / f"scale-{scale:02d}.json"


def save_scale(model_dir: Path, scale: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A finished scale: its tensors, then the JSON with their sha256, each renamed into place
    (the JSON last: a scale exists once both files are whole)."""
    tensors_path, json_path = scale_paths(model_dir, scale)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(tensors_path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(tensors_path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(tensors_path.parent)
    atomic_write_json(json_path, {**meta, "sha256": sha256_file(tensors_path)})


def load_scale(model_dir: Path, scale: int) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of a finished scale, or None when it is absent or not whole."""
    tensors_path, json_path = scale_paths(model_dir, scale)
    if not json_path.is_file() or not tensors_path.is_file():
        return None
    try:
        meta = read_json(json_path)
    except ValueError:
        return None
    if sha256_file(tensors_path) != meta.get("sha256"):
        return None
    return load_file(str(tensors_path)), meta


def scale_seed(seed: int, scale: int) -> int:
    return (seed * 1_000_003 + scale * 7919 + 12345) % (2**63)


def learning_rate(config: TrainSinGANConfig, iteration: int) -> float:
    """The paper's schedule (x0.1 at 80% of a scale), from the iteration alone."""
    return config.lr * (0.1 if iteration >= round(config.lr_drop * config.iterations) else 1.0)


def make_adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))


def train_model(
    config: TrainSinGANConfig,
    image: torch.Tensor,
    model_dir: Path,
    device: torch.device,
    progress=None,
    say=console.print,
) -> dict[str, Any]:
    """Train (or finish) the SinGAN of one image in `model_dir`; returns what model.json holds.
    A full disk or an unwritable folder is one line saying how to resume."""
    with out_of_space_or_unwritable(model_dir, "rerun the same command: it resumes"):
        return _train_model(config, image, Path(model_dir), device, progress, say)


def _train_model(config, image, model_dir, device, progress, say) -> dict[str, Any]:
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files([model_dir, model_dir / SCALES_DIR, model_dir / "checkpoints"])
    arch = model_config(config, image)
    reals = [x.to(device) for x in image_pyramid(image, arch.sizes)]
    G = SinGAN(arch).to(device)
    Ds = build_discriminators(arch).to(device)
    stats: list[dict[str, Any]] = []

    # Finished scales: their weights back in G and the Ds (the next scale starts from them).
    done = 0
    while done < arch.num_scales and (loaded := load_scale(model_dir, done)) is not None:
        tensors, meta = loaded
        G.generators[done].load_state_dict(_prefixed(tensors, "G."))
        Ds[done].load_state_dict(_prefixed(tensors, "D."))
        G.noise_amp[done] = tensors["noise_amp"].to(device)
        if done == 0:
            G.z_rec.copy_(tensors["z_rec"].to(device))
        stats.append(meta)
        done += 1
    if done:
        say(f"{model_dir.name}: scales 0..{done - 1} of {arch.num_scales} already trained")

    stop = StopSignals()
    try:
        for scale in range(done, arch.num_scales):
            stats.append(
                train_scale(config, G, Ds, reals, scale, model_dir, device, stop, progress, say)
            )
    finally:
        stop.restore()

    # The model: every scale's files are written; model.json says it is complete.
    G.eval()
    write_grid(G, image, model_dir / GRID, seed=config.seed)
    summary = {
        "model_name": MODEL,
        "model": arch.to_dict(),
        "noise_amp": G.noise_amp.tolist(),
        "scales": [
            {
                k: s[k]
                for k in ("scale", "size", "seconds", "cpu_seconds", "iterations", "last")
                if k in s
            }
            for s in stats
        ],
        "seconds": round(sum(s.get("seconds", 0.0) for s in stats), 2),
        "cpu_seconds": round(sum(s.get("cpu_seconds", 0.0) for s in stats), 2),
        "device": str(device),
    }
    return summary


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def train_scale(config, G, Ds, reals, scale, model_dir, device, stop, progress, say) -> dict:
    """Train scale `scale` from its checkpoint (or its start) to its end; write its files."""
    arch: SinGANConfig = G.config
    real = reals[scale]
    gen, D = G.generators[scale], Ds[scale]

    # Start of the scale: weights from the previous scale when widths match (the official
    # code), else fresh under the scale's seed; noise from a generator seeded by the scale.
    if scale and arch.scale_channels(scale) == arch.scale_channels(scale - 1):
        gen.load_state_dict(G.generators[scale - 1].state_dict())
        D.load_state_dict(Ds[scale - 1].state_dict())
    else:
        torch.manual_seed(scale_seed(config.seed, scale))
        init_weights(gen)
        init_weights(D)
    rng = torch.Generator().manual_seed(scale_seed(config.seed, scale))
    for module in (G.generators[:scale], Ds[:scale]):
        module.requires_grad_(False)
    gen.requires_grad_(True)
    D.requires_grad_(True)
    opt_G = make_adam(gen.parameters(), config.lr)
    opt_D = make_adam(D.parameters(), config.lr)

    # The reconstruction input (the coarser scales' reconstruction, upsampled) and this scale's
    # noise amplitude from how far it is from the real image.
    with torch.no_grad():
        if scale == 0:
            G.z_rec.copy_(torch.randn(G.z_rec.shape, generator=rng).to(device))
            rec_prev = torch.zeros_like(real)
            G.noise_amp[0] = 1.0
        else:
            rec_prev = upsample(G.reconstruct(scale - 1)[-1], arch.sizes[scale])
            rmse = torch.sqrt(F.mse_loss(rec_prev, real))
            G.noise_amp[scale] = config.noise_amp_init * rmse
    rec_noise = G.z_rec if scale == 0 else torch.zeros_like(real)

    start, seconds, cpu_seconds = 0, 0.0, 0.0
    ckpt = _latest_checkpoint(model_dir, scale)
    if ckpt is not None:
        state = ckpt["state"]
        gen.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        rng.set_state(state["rng"])
        start, seconds = state["iteration"], state["seconds"]
        cpu_seconds = state.get("cpu_seconds", 0.0)
        say(f"{model_dir.name}: scale {scale} resumes at iteration {start}")

    def score(xs: list[torch.Tensor]) -> torch.Tensor:
        return D.score(xs[0])

    def random_prev() -> torch.Tensor:
        if scale == 0:
            return torch.zeros_like(real)
        with torch.no_grad():
            coarse = G.random_upto(1, scale - 1, rng)
        return upsample(coarse, arch.sizes[scale])

    def noise() -> torch.Tensor:
        return torch.randn(real.shape, generator=rng).to(device)

    def checkpoint(iteration: int, elapsed: float, cpu: float) -> None:
        state = {"scale": scale, "iteration": iteration, "seconds": elapsed, "cpu_seconds": cpu,
                 "G": gen.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
                 "opt_D": opt_D.state_dict(), "rng": rng.get_state(),
                 "config": to_dict(config)}  # fmt: skip
        save_checkpoint(model_dir, scale * 1_000_000 + iteration, state, keep=2)

    task = None
    if progress is not None:
        h, w = arch.sizes[scale]
        task = progress.add_task(
            f"{model_dir.name[:24]} scale {scale}/{arch.num_scales - 1} ({h}x{w})",
            total=config.iterations,
            completed=start,
        )
    last: dict[str, float] = {}
    # wall time, and this process's CPU time: on a loaded machine the second is what the
    # scale would take alone (one thread)
    began, began_cpu = time.perf_counter(), time.process_time()
    for iteration in range(start, config.iterations):
        lr = learning_rate(config, iteration)
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr

        # Critic steps: WGAN-GP between the real image and fakes on fresh noise.
        requires_grad(D, True)
        for _ in range(config.d_steps):
            prev, z = random_prev(), noise()
            with torch.no_grad():
                fake = G.scale_forward(scale, z, prev)
            alpha = torch.rand(1, generator=rng).to(device)
            loss_d, stats_d = discriminator_loss(
                score, [real], [fake], config.gp_weight, drift=0.0, alpha=alpha
            )
            opt_D.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_D.step()

        # Generator steps: fool the critic, and give the image back from the fixed noise.
        requires_grad(D, False)
        for _ in range(config.g_steps):
            prev, z = random_prev(), noise()
            fake = G.scale_forward(scale, z, prev)
            adversarial = -D.score(fake).mean()
            rec = F.mse_loss(G.scale_forward(scale, rec_noise, rec_prev), real)
            loss_g = adversarial + config.rec_weight * rec
            opt_G.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_G.step()

        done = iteration + 1
        if task is not None:
            progress.advance(task)
        if done % config.checkpoint_every == 0 or done == config.iterations or stop.received:
            last = {"d_loss": stats_d["d_loss"], "wasserstein": stats_d["wasserstein"],
                    "g_adv": adversarial.item(), "rec_mse": rec.item()}  # fmt: skip
            elapsed = seconds + time.perf_counter() - began
            cpu = cpu_seconds + time.process_time() - began_cpu
            if done < config.iterations:
                checkpoint(done, elapsed, cpu)
            if stop.received:
                say(f"{stop.received}: scale {scale} checkpointed at iteration {done}; rerun "
                    "the same command to resume")  # fmt: skip
                raise TrainingStopped(stop.received)
    seconds += time.perf_counter() - began
    cpu_seconds += time.process_time() - began_cpu

    # The finished scale: its files, then the mid-scale checkpoints it no longer needs.
    tensors = {f"G.{k}": v for k, v in gen.state_dict().items()}
    tensors |= {f"D.{k}": v for k, v in D.state_dict().items()}
    tensors["noise_amp"] = G.noise_amp[scale].detach().reshape(())
    if scale == 0:
        tensors["z_rec"] = G.z_rec
    meta = {"scale": scale, "size": arch.sizes[scale], "iterations": config.iterations,
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "noise_amp": float(G.noise_amp[scale]),
            "last": last}  # fmt: skip
    save_scale(model_dir, scale, tensors, meta)
    for path in list_checkpoints(model_dir):
        if int(path.stem.split("-")[1]) // 1_000_000 <= scale:
            path.unlink(missing_ok=True)
            path.with_suffix(".safetensors").unlink(missing_ok=True)
    gen.requires_grad_(False)
    say(f"{model_dir.name}: scale {scale} ({arch.sizes[scale][0]}x{arch.sizes[scale][1]}) "
        f"done in {seconds:.1f} s, rec mse {last.get('rec_mse', float('nan')):.4f}")  # fmt: skip
    return meta


def _latest_checkpoint(model_dir: Path, scale: int) -> dict[str, Any] | None:
    """The newest checkpoint of this scale that loads (a damaged one falls back to older)."""
    for path in reversed(list_checkpoints(model_dir)):
        if int(path.stem.split("-")[1]) // 1_000_000 != scale:
            continue
        try:
            return load_checkpoint(path)
        except (UserError, ValueError, KeyError, OSError):
            continue
    return None


# --- a trained model, for generation and grids ----------------------------------------------


def load_model(model_dir: Path) -> tuple[SinGAN, dict[str, Any]]:
    """A complete model folder -> (SinGAN in eval mode, its model.json). Never unpickles."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise UserError(
            f"{model_dir} is not a trained SinGAN (no {MODEL_FILE}): finish it with the same "
            "`synthbreast train-singan` command"
        )
    info = read_json(path)
    try:
        arch = SinGANConfig.from_dict(info["model"])
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"{path}: the model cannot be rebuilt from it ({err})") from None
    G = SinGAN(arch)
    for scale in range(arch.num_scales):
        loaded = load_scale(model_dir, scale)
        if loaded is None:
            where = scale_paths(model_dir, scale)[0]
            raise UserError(
                f"{where} is missing or does not match its checksum: delete {path} and rerun "
                "the same `synthbreast train-singan` command to retrain that scale"
            )
        tensors, _ = loaded
        G.generators[scale].load_state_dict(_prefixed(tensors, "G."))
        G.noise_amp[scale] = tensors["noise_amp"]
        if scale == 0:
            G.z_rec.copy_(tensors["z_rec"])
    G.eval().requires_grad_(False)
    return G, info


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in about [-1, 1] -> (N, H, W) uint8 for grey, (N, H, W, 3) for RGB."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def write_grid(G: SinGAN, image: torch.Tensor, path: Path, seed: int = 0, count: int = 16):
    """The source, its reconstruction, then `count` variants from scale 0, 2x nearest."""
    rng = torch.Generator().manual_seed(seed)
    device = G.z_rec.device
    with torch.no_grad():
        variants = G.sample(count, rng)
        rec = G.reconstruct()[-1]
    source = upsample(image.to(device), G.config.sizes[-1]).clamp(-1, 1)
    tiles = list(to_pixels(torch.cat([source, rec, variants])))
    save_png(make_grid(tiles, columns=6, scale=2), path)


# --- the job: many images, one process each -------------------------------------------------


def check_same_job(outdir: Path, config: TrainSinGANConfig) -> None:
    path = outdir / CONFIG
    if not path.is_file():
        return
    # The config's identity fields decide the selection and the weights (synthbreast/config.py)
    differ = identity_differences(read_json(path), identity(config), option_name)
    if differ:
        raise UserError(
            f"{outdir} holds another train-singan job ({'; '.join(differ)}): use a new "
            "--outdir, or repeat that job's options to finish it"
        )


def prepare_job(config: TrainSinGANConfig) -> tuple[Path, dict[str, Any]]:
    """OUTDIR with its config.json and selection.json (written once, then checked)."""
    outdir = Path(config.outdir)
    check_same_job(outdir, config)
    selection = choose_images(config)
    outdir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files([outdir])
    path = outdir / SELECTION
    if path.is_file():
        before = read_json(path)
        if before.get("pool_sha256") != selection["pool_sha256"] or [
            i["key"] for i in before.get("images", [])
        ] != [i["key"] for i in selection["images"]]:
            raise UserError(
                f"{path} selected other images (the pool's shards changed since): use a new "
                "--outdir, or give the shards it was made from"
            )
    else:
        atomic_write_json(path, selection)
    if not (outdir / CONFIG).is_file():
        save_config(config, outdir / CONFIG)
    return outdir, selection


def model_complete(outdir: Path, item: dict[str, Any]) -> bool:
    return (outdir / item["model_dir"] / MODEL_FILE).is_file()


def train_one_model(config: TrainSinGANConfig, progress=None) -> Path:
    """Task `config.task_id`: the SinGAN of that selected image (resumed where it stopped)."""
    from synthbreast.devices import choose_device

    outdir, selection = prepare_job(config)
    item = selection["images"][config.task_id]
    model_dir = outdir / item["model_dir"]
    if model_complete(outdir, item):
        console.print(f"{model_dir}: complete, skipped", highlight=False)
        return model_dir
    device = choose_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = read_source(Path(config.shards), item)
    model_dir.mkdir(parents=True, exist_ok=True)
    if not (model_dir / SOURCE).is_file():
        from synthbreast.fileio import atomic_write_bytes

        atomic_write_bytes(model_dir / SOURCE, data)
    image = image_tensor(data, selection["channels"])
    summary = train_model(config, image, model_dir, device, progress)
    summary |= {"source": item, "class_label": config.class_label,
                "channels": selection["channels"], "patch_size": selection["patch_size"],
                "config": to_dict(config)}  # fmt: skip
    atomic_write_json(model_dir / MODEL_FILE, summary)  # last: the model is complete
    return model_dir


def train_singan(config: TrainSinGANConfig, python: str | None = None) -> dict[str, Any]:
    """Every selected image's model (or `task_id`'s alone), each in a process of its own, in
    turn; complete models are skipped. Returns {"trained", "skipped", "failed", "outdir"}."""
    validate(config)
    outdir, selection = prepare_job(config)
    items = selection["images"]
    if config.task_id is not None:
        items = [items[config.task_id]]
    result = {"outdir": str(outdir), "trained": [], "skipped": [], "failed": []}
    for item in items:
        if model_complete(outdir, item):
            result["skipped"].append(item["index"])
            continue
        console.print(
            f"model {item['index']} of {len(selection['images'])}: {item['key']} "
            f"-> {outdir / item['model_dir']}",
            highlight=False,
            soft_wrap=True,
        )
        # the job's file, with this run's shards folder, device and threads (not the job's
        # identity: they may differ from the first run's)
        command = [python or sys.executable, "-m", "synthbreast", "train-singan",
                   config.shards, "--config", str(outdir / CONFIG), "--outdir", str(outdir),
                   "--task-id", str(item["index"]), "--device", config.device]  # fmt: skip
        if config.threads is not None:
            command += ["--threads", str(config.threads)]
        done = subprocess.run(command, env=os.environ.copy(), check=False)
        if done.returncode == STOPPED:
            raise TrainingStopped(f"model {item['index']} stopped by a signal")
        key = "trained" if done.returncode == 0 and model_complete(outdir, item) else "failed"
        result[key].append(item["index"])
    return result


def grid_from_folder(model_dir: Path, out: Path, seed: int = 0, count: int = 16) -> None:
    """A grid of a complete model's source and variants (for a look at it)."""
    G, info = load_model(model_dir)
    data = (Path(model_dir) / SOURCE).read_bytes()
    image = image_tensor(data, info["channels"])
    write_grid(G, image, out, seed=seed, count=count)
