"""MSG-GAN training with accelerate: one process, or N (torchrun / accelerate launch) on CPUs,
GPUs and nodes; mixed precision; checkpoints that resume exactly.

As in StyleGAN2-ADA, the models are not wrapped in DistributedDataParallel: every rank starts
from the same seed (same initial weights), computes its share of the global batch, and the
gradients are averaged across ranks by hand before each optimizer step. DDP could not do this
here: the gradient penalty differentiates D with `autograd.grad`, which DDP does not support,
and the G step runs D frozen, which DDP would try to synchronise.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from synthbreast.config import TrainGANConfig, save_config
from synthbreast.data.reader import ShardDataset
from synthbreast.data.shards import load_manifest, pool_count, pool_shards
from synthbreast.errors import UserError
from synthbreast.fileio import atomic_write_bytes
from synthbreast.images import make_grid, save_png
from synthbreast.models.msggan import Discriminator, Generator, MSGGANConfig, image_pyramid
from synthbreast.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from synthbreast.train.ema import make_ema, update_ema
from synthbreast.train.losses import discriminator_loss, generator_loss, requires_grad

# Budgets scale widths and resolution as well as length: the paper's config costs about 22 s
# per iteration on a 2-core CPU (../shared/MSGGAN-NOTES.md), so CPUs need narrow models.
BUDGETS: dict[str, dict[str, Any]] = {
    # seconds on a laptop CPU: the tests and `pipeline --budget tiny`
    "tiny": dict(resolution=32, latent_dim=64, width=1 / 32, batch_size=8, kimg=0.16,
                 tick_kimg=0.04, snapshot_kimg=0.16, checkpoint_kimg=0.08, grid_size=16,
                 optimizer="adam", lr=0.002, g_padding="reflect"),
    # about 10 minutes per class on a 2-core CPU (~20 img/s): the demo. Adam at the official
    # MSG-GAN's betas learns in 12 kimg what RMSprop at 1e-4 does not; reflect padding stops
    # the narrow generator from drawing frames at the image border (README, "Training")
    "small": dict(resolution=64, latent_dim=128, width=1 / 16, batch_size=16, kimg=12.0,
                  tick_kimg=0.5, snapshot_kimg=2.0, checkpoint_kimg=2.0,
                  optimizer="adam", lr=0.002, g_padding="reflect"),
    # the paper: 64 px, 512 channels, batch 16, RMSprop lr 1e-4; for GPUs
    "paper": dict(resolution=64, latent_dim=512, width=1.0, batch_size=16, kimg=1000.0,
                  tick_kimg=4.0, snapshot_kimg=50.0, checkpoint_kimg=50.0,
                  optimizer="rmsprop", lr=1e-4, g_padding="zeros"),
}  # fmt: skip

MIXED_PRECISION = ("no", "fp16", "bf16")

# The paper trains with RMSprop lr 1e-4. The official MSG-GAN code uses Adam with betas
# (0, 0.99) and a larger rate, which learns much faster per image: the CPU demo budget uses it.
OPTIMIZERS = {
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99), eps=1e-8),
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r} unknown; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr)


def apply_budget(config: TrainGANConfig, budget: str | None) -> TrainGANConfig:
    if budget is None:
        return config
    if budget not in BUDGETS:
        raise UserError(f"--budget {budget!r} unknown; choose from {', '.join(BUDGETS)}")
    return replace(config, budget=budget, **BUDGETS[budget])


def model_config(config: TrainGANConfig) -> MSGGANConfig:
    return MSGGANConfig(
        resolution=config.resolution,
        latent_dim=config.latent_dim,
        width=config.width,
        g_padding=config.g_padding,
    )


def run_description(config: TrainGANConfig) -> str:
    label = "all" if config.class_label is None else f"class{config.class_label}"
    return f"msggan-{config.pool}-{label}-{config.resolution}px"


def choose_run_dir(config: TrainGANConfig) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from). New runs get the next number in outdir."""
    outdir = Path(config.outdir)
    desc = run_description(config)
    runs = sorted(p for p in outdir.glob("[0-9][0-9][0-9][0-9][0-9]-*") if p.is_dir())
    if config.resume == "auto":
        for run in reversed(runs):
            if run.name[6:] == desc and list_checkpoints(run):
                return run, list_checkpoints(run)[-1]
    elif config.resume:
        resume = Path(config.resume)
        run = resume if resume.is_dir() else resume.parent.parent
        return run, resume
    number = max((int(p.name[:5]) for p in runs), default=-1) + 1
    return outdir / f"{number:05d}-{desc}", None


# --- data ------------------------------------------------------------------------------


def image_transform(resolution: int):
    """PIL RGB -> float [-1, 1] tensor at the model's resolution (IDC 50 px -> 64 px)."""

    def transform(img):
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        if x.shape[-1] != resolution or x.shape[-2] != resolution:
            x = F.interpolate(
                x[None], size=(resolution, resolution), mode="bilinear", antialias=True
            )[0]
        return x

    return transform


def real_batches(
    dataset: ShardDataset, batch: int, workers: int, epoch: int, skip: int
) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Endless (images, epoch, batch index) for this rank, from epoch `epoch` batch `skip`.

    Each rank loops over its own shards epoch after epoch, so ranks never wait for each other
    at an epoch's end; skipping the batches consumed before a checkpoint makes resume exact.
    """
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, drop_last=True
    )
    while True:
        dataset.set_epoch(epoch)
        index = 0
        for sample in loader:
            if index >= skip:
                yield sample["image"], epoch, index + 1
            index += 1
        if index == 0:
            raise UserError("this process's shards hold fewer images than one batch")
        epoch, skip = epoch + 1, 0


# --- the distributed pieces ------------------------------------------------------------


def average_gradients(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Mean of every gradient over ranks, in one flat all-reduce."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flag: bool, accelerator: Accelerator) -> bool:
    """True on every rank when it is True on any (a signal may reach only some ranks)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class StopSignals:
    """SIGTERM / SIGUSR1 (Slurm's warning before a time limit or preemption) -> checkpoint, stop."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


# --- state for checkpoints -------------------------------------------------------------


def rng_state(latent_rng: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "latent": latent_rng.get_state()}
    state["python"] = random.getstate()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], latent_rng: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    latent_rng.set_state(state["latent"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(saved: dict[str, Any], model: MSGGANConfig, path: Path) -> None:
    if saved != model.to_dict():
        diff = {k: (saved.get(k), v) for k, v in model.to_dict().items() if saved.get(k) != v}
        raise UserError(
            f"checkpoint {path} was trained with a different model config {diff} "
            "(saved, asked): resume with the same --resolution/--width/--latent-dim, or start a "
            "new run without --resume"
        )


# --- the loop --------------------------------------------------------------------------


def train_gan(config: TrainGANConfig, progress_print=print) -> Path:
    """Train; returns the run folder. `progress_print` gets one line per tick (main process)."""
    if config.mixed_precision not in MIXED_PRECISION:
        raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(
            f"--optimizer {config.optimizer!r} unknown; choose from {', '.join(OPTIMIZERS)}"
        )
    # cpu=True without a GPU: only then does accelerate take a torchrun launch as multi-CPU
    # (gloo) instead of N independent single processes
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available()
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise UserError(f"--batch-size {config.batch_size} is not divisible by {world} processes")
    main = accelerator.is_main_process
    device = accelerator.device

    # Data: this rank's share of the pool's shards.
    shards = Path(config.shards)
    manifest = load_manifest(shards)
    classes = None if config.class_label is None else [config.class_label]
    paths = pool_shards(shards, manifest, config.pool)  # a clear error for an unknown pool
    if pool_count(manifest, config.pool, classes) == 0:
        what = "images" if classes is None else f"images of class {config.class_label}"
        raise UserError(
            f"pool {config.pool!r} of {shards} has no {what}: "
            f"classes there: {manifest['pools'][config.pool]['counts']}"
        )
    if len(paths) < world:
        raise UserError(
            f"pool {config.pool!r} has {len(paths)} shards for {world} processes: "
            "re-ingest with --min-shards at least the number of processes"
        )
    dataset = ShardDataset(
        paths, classes=classes, shuffle=True, seed=config.seed,
        transform=image_transform(config.resolution),
    )  # fmt: skip

    # Run folder and resume point, decided on the main process and shared.
    choice = [str(p) if p else None for p in choose_run_dir(config)]
    run_dir, resume_from = accelerator.gather_for_metrics([choice], use_gather_object=True)[0]
    run_dir, resume_from = Path(run_dir), resume_from and Path(resume_from)

    # Models: the same seed on every rank gives the same initial weights.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = model_config(config)
    G, D = Generator(model).to(device), Discriminator(model).to(device)
    G_ema = make_ema(G)
    opt_G = make_optimizer(config.optimizer, G.parameters(), config.lr)
    opt_D = make_optimizer(config.optimizer, D.parameters(), config.lr)
    opt_G, opt_D = accelerator.prepare(opt_G, opt_D)  # loss scaling under fp16
    latent_rng = torch.Generator().manual_seed(config.seed * 1000 + rank)
    grid_z = torch.randn(
        config.grid_size, config.latent_dim, generator=torch.Generator().manual_seed(config.seed)
    )
    step, epoch, batch_index, history = 0, 0, 0, []

    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        state = ckpt["state"]
        check_compatible(state["model"], model, ckpt["path"])
        saved_optimizer = state["config"].get("optimizer", "rmsprop")
        if saved_optimizer != config.optimizer:
            raise UserError(
                f"checkpoint {ckpt['path']} was trained with --optimizer {saved_optimizer}: "
                f"resume with the same optimizer, or start a new run without --resume"
            )
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        G_ema.load_state_dict(state["G_ema"])
        opt_G.load_state_dict(state["optG"])
        opt_D.load_state_dict(state["optD"])
        step = state["step"]
        positions = state["data"]
        if len(positions) == world:
            epoch, batch_index = positions[rank]
        else:  # another number of processes: start a fresh epoch, the position is per rank
            epoch, batch_index = max(p[0] for p in positions) + 1, 0
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank], latent_rng)
        history = state.get("history", [])
        if main:
            progress_print(f"resumed from {ckpt['path']} at step {step}")

    if main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
        if resume_from is not None:  # ticks logged after the checkpoint will be logged again
            truncate_stats(run_dir / "stats.jsonl", step)
    accelerator.wait_for_everyone()

    per_rank = config.batch_size // world
    total_steps = math.ceil(config.kimg * 1000 / config.batch_size)

    def steps_of(kimg: float) -> int:
        return max(1, round(kimg * 1000 / config.batch_size))

    reals = real_batches(dataset, per_rank, config.workers, epoch, batch_index)
    stop = StopSignals()
    tick_start, tick_images = time.perf_counter(), 0
    scales = model.scales()

    def checkpoint() -> None:
        # every rank's data position and RNG state, so that each resumes exactly
        positions = accelerator.gather_for_metrics([[epoch, batch_index]], use_gather_object=True)
        rngs = accelerator.gather_for_metrics([rng_state(latent_rng)], use_gather_object=True)
        if main:
            state = {
                "config": asdict(config),
                "model": model.to_dict(),
                "G": G.state_dict(),
                "D": D.state_dict(),
                "G_ema": G_ema.state_dict(),
                "optG": opt_G.state_dict(),
                "optD": opt_D.state_dict(),
                "step": step,
                "kimg": step * config.batch_size / 1000,
                "data": positions,
                "rng": rngs,
                "history": history,
            }
            save_checkpoint(run_dir, step, state)
        accelerator.wait_for_everyone()

    while step < total_steps:
        # --- discriminator step: G under no_grad, gradient penalty inside the loss
        real, epoch, batch_index = next(reals)
        real_scales = image_pyramid(real.to(device), scales)
        requires_grad(D, True)
        z = torch.randn(per_rank, config.latent_dim, generator=latent_rng).to(device)
        alpha = torch.rand(per_rank, generator=latent_rng).to(device)
        with torch.no_grad(), accelerator.autocast():
            fake_scales = G(z)
        with accelerator.autocast():
            d_loss, d_stats = discriminator_loss(
                D, real_scales, fake_scales, config.gp_weight, config.drift, alpha=alpha
            )
        opt_D.zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        average_gradients(D, accelerator)
        opt_D.step()

        # --- generator step: D frozen, so its weight gradients are not computed
        requires_grad(D, False)
        z = torch.randn(per_rank, config.latent_dim, generator=latent_rng).to(device)
        with accelerator.autocast():
            g_loss, g_stats = generator_loss(D, G(z))
        opt_G.zero_grad(set_to_none=True)
        accelerator.backward(g_loss)
        average_gradients(G, accelerator)
        opt_G.step()
        # EMA half-life ramps up with training, as in StyleGAN2-ADA (ema_rampup 0.05)
        ema_images = min(config.ema_kimg * 1000, step * config.batch_size * 0.05)
        ema_beta = 0.5 ** (config.batch_size / max(ema_images, 1e-8))
        update_ema(G_ema, G, ema_beta)
        step += 1
        tick_images += config.batch_size

        # --- log, snapshot, checkpoint, stop on a signal
        done = step >= total_steps
        if step % steps_of(config.tick_kimg) == 0 or done:
            seconds = time.perf_counter() - tick_start
            line = {
                "step": step,
                "kimg": round(step * config.batch_size / 1000, 3),
                "img_per_s": round(tick_images / seconds, 2),
                "processes": world,
                **{k: round(float(v), 5) for k, v in {**d_stats, **g_stats}.items()},
            }
            if torch.cuda.is_available():
                line["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            history.append(line)
            if main:
                progress_print(line)
                _append_jsonl(run_dir / "stats.jsonl", line)
            tick_start, tick_images = time.perf_counter(), 0
        if main and (step % steps_of(config.snapshot_kimg) == 0 or done):
            write_grid(G_ema, grid_z, device, run_dir / "samples" / f"fakes-{step:09d}.png")
        stopping = any_rank(stop.received is not None, accelerator)
        if step % steps_of(config.checkpoint_kimg) == 0 or done or stopping:
            checkpoint()
        if stopping and not done:
            if main:
                progress_print(
                    f"stopped by {stop.received or 'a signal'} at step {step}: checkpoint saved, "
                    "rerun with --resume auto to continue"
                )
            raise TrainingInterrupted(run_dir)
    accelerator.end_training()
    return run_dir


class TrainingInterrupted(Exception):
    """A stop signal arrived; the state is checkpointed. The CLI exits with 143 (SIGTERM)."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


@torch.no_grad()
def write_grid(G: torch.nn.Module, z: torch.Tensor, device, path: Path) -> None:
    images = G(z.to(device))[-1].float().clamp(-1, 1)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    save_png(make_grid(list(pixels), scale=2), path)


def truncate_stats(path: Path, step: int) -> None:
    """Keep the tick lines up to `step`: a resumed run repeats the steps after its checkpoint."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _append_jsonl(path: Path, line: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:  # append-only results, one JSON per line
        f.write(json.dumps(line) + "\n")
