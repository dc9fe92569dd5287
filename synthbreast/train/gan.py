"""GAN training with accelerate: one process, or N (torchrun / accelerate launch) on CPUs,
GPUs and nodes; mixed precision; checkpoints that resume exactly.

The model comes from the registry (synthbreast/models/registry.py) by name: this loop knows
only what a spec gives it (build G and D, what D reads of a real batch, whether labels go in).

As in StyleGAN2-ADA, the models are not wrapped in DistributedDataParallel: every rank starts
from the same seed (same initial weights), computes its share of the global batch, and the
gradients are averaged across ranks by hand before each optimizer step. DDP could not do this
here: the gradient penalties differentiate D with `autograd.grad`, which DDP does not support,
and the G step runs D frozen, which DDP would try to synchronise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from synthbreast.config import TrainGANConfig, save_config
from synthbreast.data.reader import READ_ERRORS, ShardDataset, find_unreadable, to_uint8_tensor
from synthbreast.data.shards import (
    MANIFEST,
    load_manifest,
    manifest_channels,
    pool_count,
    pool_shards,
    verify_pool,
)
from synthbreast.errors import UserError
from synthbreast.fileio import atomic_write_bytes, sha256_file
from synthbreast.images import make_grid, save_png
from synthbreast.models.registry import MODELS, GANSpec, get_model
from synthbreast.options import is_int, is_number, option_name
from synthbreast.options import refuse as refuse_option
from synthbreast.results import CONFIG, METRIC_FILE, STATS
from synthbreast.train.augment import AUGMENTS, AdaptiveP, Augment, dihedral
from synthbreast.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    out_of_space_or_unwritable,
    remove_stale_temp_files,
    save_checkpoint,
)
from synthbreast.train.ema import make_ema, update_ema
from synthbreast.train.losses import (
    G_CLASS_SHARE,
    LOSSES,
    ClassTerm,
    LossSettings,
    d_loss,
    g_loss,
    requires_grad,
)

# Budgets scale widths and resolution as well as length: the paper's config costs about 22 s
# per iteration on a 2-core CPU (../shared/MSGGAN-NOTES.md), so CPUs need narrow models.
# tiny/small were chosen by measurement on the real IDC sample (README, "Training"): in the
# same wall time WGAN-GP learnt more than the logistic loss with lazy R1, DiffAugment delayed
# the first structure past 4 kimg (diversity 0.005 where none had 0.9), and batch 8 beat batch
# 16 (twice the steps per image: diversity 0.95 against 0.12 after 3 kimg). Flips/rotations of
# the reals are free. Adam at the official MSG-GAN's betas learns in minutes what RMSprop at
# 1e-4 does not; reflect padding stops the narrow generator from drawing frames at the border.
SMALL_DATA = dict(optimizer="adam", lr=0.002, g_padding="reflect", loss="wgan-gp",
                  augment="none", dihedral=True, batch_size=8)  # fmt: skip
BUDGETS: dict[str, dict[str, Any]] = {
    # seconds on a laptop CPU: the tests and `pipeline --budget tiny`
    "tiny": dict(resolution=32, latent_dim=64, width=1 / 32, kimg=0.16, tick_kimg=0.04,
                 snapshot_kimg=0.16, checkpoint_kimg=0.08, grid_size=16, metric_images=64,
                 **SMALL_DATA),
    # the CPU demo: about 10 minutes on 2 cores (~33 img/s) for one conditional model.
    # Bilinear upsampling with per-pixel noise in every block (README, "Training"): nearest
    # drew grid artefacts (synth-real AUC 0.42 on the real sample with ImageNet features);
    # bilinear alone lost the demo's nuclei (recall 0.03, the collapse gate stopped the
    # README's first command); with the noise, recall 0.32 on the demo and 0.20 on the real
    # sample, images with stroma, fat and nuclei (one run each). The gradient penalty every
    # 4 steps (weighted by 4) gives 1.4x the images per second and learnt as well per kimg,
    # so the same minutes buy 20 kimg where 14 were: real-sample recall 0.28 / 0.18 at 20
    # against 0.14 / 0.14 at 14 with the penalty every step. channels_last (TRAIN_LAYOUT)
    # made the step 1.35x faster again, so 26 kimg now cost what 20 did (805 s against 833 s)
    # and the real sample was still learning there: KID 1.82 -> 1.24, recall 0.23 / 0.20 ->
    # 0.38 / 0.27 from 20 to 26 kimg (one 28 kimg run, README "Training"). The AC class loss
    # at 0.3 (conditional models only, CONDITIONAL_ONLY): on three patient splits of the real
    # sample, synth-real balanced accuracy 0.69 / 0.69 / 0.65 and AUC 0.78 / 0.84 / 0.75 at
    # the snapshot the rule takes, against 0.50 / 0.65 / 0.58 and 0.49 / 0.88 / 0.61 without
    # (README "Training", 2026-12-06/07)
    "small": dict(resolution=64, latent_dim=128, width=1 / 16, kimg=26.0, tick_kimg=0.5,
                  snapshot_kimg=2.0, checkpoint_kimg=2.0, metric_images=256,
                  g_upsample="bilinear", g_noise="all", gp_interval=4, class_weight=0.3,
                  **SMALL_DATA),
    # the paper: 64 px, 512 channels, batch 16, WGAN-GP, RMSprop lr 1e-4; for GPUs
    "paper": dict(resolution=64, latent_dim=512, width=1.0, batch_size=16, kimg=1000.0,
                  tick_kimg=4.0, snapshot_kimg=50.0, checkpoint_kimg=50.0, metric_images=1000,
                  optimizer="rmsprop", lr=1e-4, g_padding="zeros", loss="wgan-gp",
                  augment="none", dihedral=False),
}  # fmt: skip

MIXED_PRECISION = ("no", "fp16", "bf16")
TRAIN_LAYOUT = torch.channels_last  # G, D and the real batches (see _train_gan)

# The paper trains with RMSprop lr 1e-4. The official MSG-GAN code uses Adam with betas
# (0, 0.99) and a larger rate, which learns much faster per image: the CPU budgets use it.
OPTIMIZERS = {
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99), eps=1e-8),
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r} unknown; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state with each moment in its parameter's memory layout.

    Checkpoints store tensors contiguous (NCHW), while training runs channels_last
    (TRAIN_LAYOUT). torch's loop and foreach optimizers pair a moment with its parameter
    element by element, but its fused Adam pairs them by memory position: after a resume it
    would update each weight with another weight's moments (found when fused Adam broke the
    bit-exact resume tests; measured: parameters 0.009 apart after 3 steps). Restoring each
    state tensor in its parameter's layout makes the resume exact for every implementation."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for name, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    moments[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# Budget values only a model of several classes takes: a budget gives them to conditional
# models alone (`--budget small --model msggan --class 1` trains without the class loss),
# while the same value given as a flag to a model of one class is refused (validate).
CONDITIONAL_ONLY = ("class_weight",)


def apply_budget(config: TrainGANConfig, budget: str | None) -> TrainGANConfig:
    """The budget's values over `config`, whose model must already be set (see
    CONDITIONAL_ONLY); flags the user gave go over the result."""
    if budget is None:
        return config
    if budget not in BUDGETS:
        raise UserError(f"--budget {budget!r} unknown; choose from {', '.join(BUDGETS)}")
    values = BUDGETS[budget]
    if not get_model(config.model).conditional:
        values = {k: v for k, v in values.items() if k not in CONDITIONAL_ONLY}
    return replace(config, budget=budget, **values)


# The numeric settings and the values each takes: checked before any folder is made, so a bad
# value is one line naming it instead of a traceback (or a run that trains nothing).
AT_LEAST_ONE = ("batch_size", "latent_dim", "gp_interval", "r1_interval", "grid_size")
AT_LEAST_ZERO = ("workers",)
ABOVE_ZERO = ("kimg", "tick_kimg", "snapshot_kimg", "checkpoint_kimg", "lr", "width")
ZERO_OR_MORE = ("gp_weight", "drift", "r1_gamma", "ema_kimg", "class_weight")
MIN_RESOLUTION = 8  # MSG-GAN's pyramid starts at 4x4 and doubles (synthbreast/models/msggan.py)


def validate_numbers(config: TrainGANConfig) -> None:
    """One line naming the first numeric option out of range and the values it takes."""

    def refuse(field: str, allowed: str) -> None:
        refuse_option(config, field, allowed)

    res = config.resolution
    if not is_int(res) or res < MIN_RESOLUTION or res & (res - 1):
        refuse("resolution", f"must be a power of two >= {MIN_RESOLUTION} (8, 16, 32, 64, 128...)")
    for field in AT_LEAST_ONE:
        if not is_int(getattr(config, field)) or getattr(config, field) < 1:
            refuse(field, "must be a whole number >= 1")
    for field in AT_LEAST_ZERO:
        if not is_int(getattr(config, field)) or getattr(config, field) < 0:
            refuse(field, "must be a whole number >= 0 (0: read the shards in the main process)")
    for field in ABOVE_ZERO:
        if not is_number(getattr(config, field)) or getattr(config, field) <= 0:
            refuse(field, "must be a number > 0")
    for field in ZERO_OR_MORE:
        if not is_number(getattr(config, field)) or getattr(config, field) < 0:
            refuse(field, "must be a number >= 0")
    if not is_int(config.metric_images) or config.metric_images == 1 or config.metric_images < 0:
        refuse("metric_images", "must be 0 (no snapshot metric) or a whole number >= 2 (KID)")
    if not is_int(config.seed):
        refuse("seed", "must be a whole number")
    label = config.class_label
    if label is not None and (not is_int(label) or label < 0):
        refuse("class_label", "must be a class number >= 0 (see the manifest's class_names)")


def validate(config: TrainGANConfig) -> GANSpec:
    """Every choice by name and every number checked before any work; returns the model's spec."""
    validate_numbers(config)
    choices = {
        "--mixed-precision": (config.mixed_precision, MIXED_PRECISION),
        "--optimizer": (config.optimizer, tuple(OPTIMIZERS)),
        "--loss": (config.loss, LOSSES),
        "--augment": (config.augment, AUGMENTS),
        "--model": (config.model, tuple(MODELS)),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{flag} {value!r} unknown; choose from {', '.join(allowed)}")
    spec = get_model(config.model)
    if spec.conditional and config.class_label is not None:
        raise UserError(
            f"--model {spec.name} trains every class in one model: drop --class "
            f"{config.class_label}, or use --model msggan for one model per class"
        )
    if config.class_weight > 0 and not spec.conditional:
        raise UserError(
            f"--class-weight {config.class_weight} needs class labels in the model: "
            "use --model msggan-cond, or --class-weight 0"
        )
    return spec


def model_config(
    config: TrainGANConfig, spec: GANSpec, num_classes: int, image_channels: int = 3
) -> Any:
    try:
        return spec.config_type(
            resolution=config.resolution,
            latent_dim=config.latent_dim,
            width=config.width,
            g_fmap_min=config.g_fmap_min,
            g_padding=config.g_padding,
            g_upsample=config.g_upsample,
            g_noise=config.g_noise,
            g_condition=config.g_condition,
            d_classifier=config.class_weight > 0,
            num_classes=num_classes if spec.conditional else 0,
            image_channels=image_channels,  # the shards' channels: 1 for grey mammograms
        )
    except ValueError as err:
        raise UserError(f"model settings: {err}") from None


def run_description(config: TrainGANConfig) -> str:
    label = "all" if config.class_label is None else f"class{config.class_label}"
    return f"{config.model}-{config.pool}-{label}-{config.resolution}px"


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
    """PIL RGB or grey -> float [-1, 1] tensor [C, H, W] at the model's resolution (IDC
    50 px -> 64 px); a grey 'L' image stays one channel."""

    def transform(img):
        x = to_uint8_tensor(img).float().div_(127.5).sub_(1.0)
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
            raise UserError(
                "this process's shards hold fewer images than one batch"
                + ("" if dataset.classes is None else f" of class {sorted(dataset.classes)}")
                + ": lower --batch-size or the number of processes"
            )
        epoch, skip = epoch + 1, 0


def batch_shares(batch: int, groups: int) -> list[int]:
    """Split a batch into `groups` near-equal parts (16 over 3 classes: 6, 5, 5)."""
    return [batch // groups + (1 if i < batch % groups else 0) for i in range(groups)]


# A class stream whose epoch is shorter than this many batches is read in the main process:
# its DataLoader worker would be forked anew every epoch (a MIAS class of ~30 patches: every
# ~10 steps), which cost more than decoding a few small PNGs per step. 0 workers and 1 give
# the same samples in the same order, so the arithmetic is unchanged. Measured on the MIAS
# real sample, `small` budget, 2 cores: 21 img/s in the main process against 18 with workers.
MIN_WORKER_BATCHES = 200


def stream_images(paths: list[Path], classes: list[int] | None) -> int:
    """Images of these classes in these shards of one ingest, from its manifest's counts."""
    if not paths:
        return 0
    wanted = None if classes is None else {str(c) for c in classes}
    names = {Path(p).name for p in paths}
    shards = load_manifest(Path(paths[0]).parent)["shards"]
    return sum(
        n
        for s in shards
        if s["name"] in names
        for c, n in s["counts"].items()
        if wanted is None or c in wanted
    )


class RealStreams:
    """The real batches of one rank: one stream per class for a conditional model (each batch
    holds every class in equal shares), else one stream. `positions` resume each exactly."""

    def __init__(self, config: TrainGANConfig, paths, class_groups, per_rank, positions):
        self.labels = class_groups
        shares = batch_shares(per_rank, len(class_groups))
        self.positions = [list(p) for p in positions]
        transform = image_transform(config.resolution)
        self.streams = []
        for i, (classes, share) in enumerate(zip(class_groups, shares, strict=True)):
            dataset = ShardDataset(
                paths, classes=classes, shuffle=True, seed=config.seed + i, transform=transform
            )
            workers = config.workers
            if len(class_groups) > 1:  # one stream per class: one worker keeps the order
                short = stream_images(paths, classes) < MIN_WORKER_BATCHES * share
                workers = 0 if short else min(config.workers, 1)
            self.streams.append(real_batches(dataset, share, workers, *self.positions[i]))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for i, stream in enumerate(self.streams):
            batch, epoch, index = next(stream)
            self.positions[i] = [epoch, index]
            images.append(batch)
            group = self.labels[i]
            labels.append(torch.full((len(batch),), group[0] if group else -1))
        return torch.cat(images), torch.cat(labels)


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


def check_compatible(saved: dict[str, Any], model: Any, path: Path) -> None:
    # fields added since (image_channels) take their defaults, as the model had them then
    with contextlib.suppress(ValueError, TypeError):
        saved = type(model).from_dict(saved).to_dict()
    if saved != model.to_dict():
        diff = {k: (saved.get(k), v) for k, v in model.to_dict().items() if saved.get(k) != v}
        raise UserError(
            f"checkpoint {path} was trained with a different model config {diff} "
            "(saved, asked): resume with the same --resolution/--width/--latent-dim, or start a "
            "new run without --resume"
        )


# Settings a resumed run must share with its checkpoint: another value would silently train
# another model (or another class) under the old run's name; another batch size or seed would
# skip the wrong images and draw another shuffle, so the resume would not be exact.
RESUME_FIELDS = ("model", "class_label", "pool", "optimizer", "loss", "augment", "batch_size",
                 "seed")  # fmt: skip


def training_inputs(shards: Path, manifest: dict[str, Any], pool: str) -> dict[str, Any]:
    """What the run reads, as its checkpoints record it: the shard folder (resolved), its
    manifest's sha256, and one sha256 over the pool's shards (names and checksums): the same
    images wherever the folder is, whatever else of the manifest changed."""
    listed = sorted((s["name"], s["sha256"]) for s in manifest["shards"] if s["pool"] == pool)
    digest = hashlib.sha256(json.dumps(listed).encode()).hexdigest()
    return {
        "shards": str(Path(shards).resolve()),
        "manifest_sha256": sha256_file(Path(shards) / MANIFEST),
        "pool_sha256": digest,
    }


def check_resume(
    saved: dict[str, Any],
    config: TrainGANConfig,
    path: Path,
    saved_inputs: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Refuse a resume that would continue the checkpoint's run as another job, naming the
    field (as in the checkpoint's config) and the fix."""
    legacy = {"model": "msggan", "optimizer": "rmsprop", "loss": "wgan-gp", "augment": "none"}
    fix = "or start a new run without --resume (--resume auto picks the run of the same kind)"
    for name in RESUME_FIELDS:
        if name not in saved and name not in legacy:
            continue  # a checkpoint older than the field: nothing to compare with
        before = saved.get(name, legacy.get(name))
        now = getattr(config, name)
        if before != now:
            flag = option_name(name)
            raise UserError(
                f"checkpoint {path} was trained with {flag} {before} (config field {name}), "
                f"this run asks for {now}: resume with {flag} {before}, {fix}"
            )
    # the shards: the same pool content (a moved or copied folder is fine); without the
    # checkpoint's record of it, the same folder
    if saved_inputs and inputs and saved_inputs.get("pool_sha256"):
        same = saved_inputs["pool_sha256"] == inputs["pool_sha256"]
        before, other = saved_inputs.get("shards"), "whose pool holds other shards"
    else:
        before, other = saved.get("shards"), "another folder"
        same = before is None or Path(before).resolve() == Path(config.shards).resolve()
    if not same:
        raise UserError(
            f"checkpoint {path} was trained on pool {config.pool!r} of {before} (config field "
            f"shards), this run reads {config.shards}, {other}: resume with SHARDS {before}, "
            f"{fix}"
        )


def scaler_state(scaler: Any) -> dict[str, Any] | None:
    """The fp16 loss scaler's state (scale, growth tracker...: plain numbers), or None."""
    if scaler is None:
        return None
    return dict(scaler.state_dict()) or None  # {} when the scaler is disabled


def load_scaler_state(scaler: Any, saved: dict[str, Any] | None, path: Path, say) -> None:
    """Restore the loss scale a checkpoint saved; a checkpoint without one restarts it."""
    if scaler is None:
        return
    if not saved:
        say(f"{path} holds no fp16 loss-scale state (written without it): the scale restarts")
        return
    scaler.load_state_dict(saved)


# --- the quality metric at every snapshot ------------------------------------------------


def best_metric_step(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """(step, line) of the best snapshot (quality.SNAPSHOT_RULE) whose checkpoint exists."""
    from synthbreast.eval.quality import best_snapshot

    path = Path(run_dir) / METRIC_FILE
    if not path.is_file():
        return None
    have = {int(p.stem.split("-")[1]) for p in list_checkpoints(run_dir)}
    best = best_snapshot([line for _, line in jsonl_lines(path) if line["step"] in have])
    return None if best is None else (best["step"], best)


# --- the loop --------------------------------------------------------------------------


def train_gan(config: TrainGANConfig, progress_print=print) -> Path:
    """Train; returns the run folder. `progress_print` gets one line per tick (main process).
    A full disk or an unwritable outdir is a one-line UserError saying how to resume."""
    resume = "rerun the same command with --resume auto (it continues from the last checkpoint)"
    with out_of_space_or_unwritable(config.outdir, resume):
        return _train_gan(config, progress_print)


def bf16_warning(mixed_precision: str, device: torch.device) -> str | None:
    """A warning when bf16 autocast would run emulated: on a CPU without AVX-512 (or AMX)
    oneDNN has no bf16 kernels, and the `small` step ran 3.4 img/s in bf16 against 22.4 in
    fp32 on an AVX2-only machine (bench/gan_budget_step.py --variants speed, 2026-12-03)."""
    if mixed_precision != "bf16" or device.type != "cpu":
        return None
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (
        f"warning: --mixed-precision bf16 on a CPU without native bf16 "
        f"({torch.backends.cpu.get_cpu_capability()}): emulated, several times slower than "
        "fp32 (`--mixed-precision no`)"
    )


def _train_gan(config: TrainGANConfig, progress_print) -> Path:
    spec = validate(config)
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
    if main and (warning := bf16_warning(config.mixed_precision, device)):
        progress_print(warning)

    # Data: this rank's share of the pool's shards; the class groups of the real streams.
    shards = Path(config.shards)
    manifest = load_manifest(shards)
    # The ingest complete and every shard of the pool matching its sha256, checked once (on
    # the main process) and the verdict shared, so that every rank stops alike.
    problem = None
    if main:
        try:
            verify_pool(shards, manifest, config.pool)
        except UserError as err:
            problem = str(err)
    problem = accelerator.gather_for_metrics([problem], use_gather_object=True)[0]
    if problem:
        raise UserError(problem)
    inputs = training_inputs(shards, manifest, config.pool)
    num_classes = len(manifest["source"]["class_names"])
    paths = pool_shards(shards, manifest, config.pool)  # a clear error for an unknown pool
    if spec.conditional:
        groups: list[list[int] | None] = [[c] for c in range(num_classes)]
    else:
        groups = [None if config.class_label is None else [config.class_label]]
    for group in groups:
        if pool_count(manifest, config.pool, group) == 0:
            what = "images" if group is None else f"images of class {group[0]}"
            raise UserError(
                f"pool {config.pool!r} of {shards} has no {what}: "
                f"classes there: {manifest['pools'][config.pool]['counts']}"
            )
    if len(paths) < world:
        raise UserError(
            f"pool {config.pool!r} has {len(paths)} shards for {world} processes: "
            "re-ingest with --min-shards at least the number of processes"
        )
    per_rank = config.batch_size // world
    if per_rank < len(groups):
        raise UserError(
            f"--batch-size {config.batch_size} over {world} processes leaves {per_rank} images "
            f"for {len(groups)} classes: raise --batch-size"
        )

    # Run folder and resume point, decided on the main process and shared.
    choice = [str(p) if p else None for p in choose_run_dir(config)]
    run_dir, resume_from = accelerator.gather_for_metrics([choice], use_gather_object=True)[0]
    run_dir, resume_from = Path(run_dir), resume_from and Path(resume_from)

    # Models: the same seed on every rank gives the same initial weights.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = model_config(config, spec, num_classes, manifest_channels(manifest))
    # channels_last, oneDNN's (and cuDNN's tensor-core) native layout: in NCHW every conv of
    # the `small` budget reordered its input and output: channels_last ran the step 1.35x
    # faster (32.3 against 24.0 img/s, bench/gan_budget_step.py --variants speed). The
    # arithmetic is the same; tests/test_msggan.py checks losses and gradients against NCHW.
    G = spec.generator(model).to(device, memory_format=TRAIN_LAYOUT)
    D = spec.discriminator(model).to(device, memory_format=TRAIN_LAYOUT)
    G_ema = make_ema(G)
    opt_G = make_optimizer(config.optimizer, G.parameters(), config.lr)
    opt_D = make_optimizer(config.optimizer, D.parameters(), config.lr)
    opt_G, opt_D = accelerator.prepare(opt_G, opt_D)  # loss scaling under fp16
    # fp16 on a GPU: the GradScaler both optimizers step through; its scale is checkpointed
    scaler = accelerator.scaler
    latent_rng = torch.Generator().manual_seed(config.seed * 1000 + rank)
    grid_z = torch.randn(
        config.grid_size, config.latent_dim, generator=torch.Generator().manual_seed(config.seed)
    )
    # a conditional grid shows each class in its own block of rows
    grid_labels = (
        torch.arange(config.grid_size) * num_classes // config.grid_size
        if spec.conditional
        else None
    )
    losses = LossSettings(
        config.gp_weight, config.drift, config.gp_interval, config.r1_gamma, config.r1_interval
    )
    ada = AdaptiveP(config.batch_size) if config.augment == "ada" else None
    class_term = ClassTerm(config.class_weight) if config.class_weight > 0 else None
    step, history = 0, []
    positions = [[0, 0] for _ in groups]

    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        state = ckpt["state"]
        check_compatible(state["model"], model, ckpt["path"])
        check_resume(state["config"], config, ckpt["path"], state.get("inputs"), inputs)
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        G_ema.load_state_dict(state["G_ema"])
        load_optimizer_state(opt_G, state["optG"])
        load_optimizer_state(opt_D, state["optD"])
        step = state["step"]
        saved = state["data"]
        # [epoch, index] per stream per rank; checkpoints before class streams: one per rank
        saved = [p if isinstance(p[0], list) else [p] for p in saved]
        if len(saved) == world and len(saved[rank]) == len(groups):
            positions = saved[rank]
        else:  # another number of processes: start a fresh epoch, the position is per rank
            fresh = max(p[0] for rank_positions in saved for p in rank_positions) + 1
            positions = [[fresh, 0] for _ in groups]
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank], latent_rng)
        if ada is not None and "ada" in state:
            ada.load(state["ada"])
        load_scaler_state(scaler, state.get("scaler"), ckpt["path"], progress_print)
        history = state.get("history", [])
        if main:
            progress_print(f"resumed from {ckpt['path']} at step {step}")

    if main:
        # half-written files (grid, checkpoint, log) of a run killed or stopped by a full disk
        folders = [run_dir, run_dir / "samples", run_dir / "checkpoints"]
        if stale := remove_stale_temp_files(folders):
            progress_print(
                f"removed {len(stale)} stale temp file(s) of an earlier try from {run_dir}"
            )
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG)
        if resume_from is not None:  # ticks logged after the checkpoint will be logged again
            truncate_stats(run_dir / STATS, step)
            truncate_stats(run_dir / METRIC_FILE, step)
    metric = None
    if main and config.metric_images > 0:
        from synthbreast.eval.quality import GeneratorQuality

        labels = [None if g is None else g[0] for g in groups]
        try:
            metric = GeneratorQuality(
                paths, labels, config.metric_images, config.latent_dim, config.seed
            )
        except READ_ERRORS:
            find_unreadable(paths)  # a ShardReadError naming the shard and the sample
            raise
    accelerator.wait_for_everyone()

    total_steps = math.ceil(config.kimg * 1000 / config.batch_size)

    def steps_of(kimg: float) -> int:
        return max(1, round(kimg * 1000 / config.batch_size))

    reals = RealStreams(config, paths, groups, per_rank, positions)
    stop = StopSignals()
    tick_start, tick_images = time.perf_counter(), 0

    def critic(labels):
        """D as the losses call it: on augmented inputs (fresh parameters per call, as
        DiffAugment draws them for real and fake apart), with the batch's labels."""
        p = 1.0 if config.augment == "diffaug" else ada.p if ada is not None else 0.0

        def score(scales):
            seen = scales
            if p > 0:
                scales = Augment(len(scales[0]), p, latent_rng)(scales)
            if class_term is None:
                return D(scales, labels)
            scores, logits = D(scales, labels, logits=True)
            class_term.keep(seen, logits)  # the class term's logits, no second D pass
            return scores

        return score

    def checkpoint(protect: int | None = None) -> None:
        # every rank's data position and RNG state, so that each resumes exactly
        all_positions = accelerator.gather_for_metrics([reals.positions], use_gather_object=True)
        rngs = accelerator.gather_for_metrics([rng_state(latent_rng)], use_gather_object=True)
        if main:
            state = {
                "model_name": spec.name,
                "config": asdict(config),
                "inputs": inputs,
                "model": model.to_dict(),
                "G": G.state_dict(),
                "D": D.state_dict(),
                "G_ema": G_ema.state_dict(),
                "optG": opt_G.state_dict(),
                "optD": opt_D.state_dict(),
                "step": step,
                "kimg": step * config.batch_size / 1000,
                "data": all_positions,
                "rng": rngs,
                "history": history,
            }
            if ada is not None:
                state["ada"] = ada.state()
            if (loss_scale := scaler_state(scaler)) is not None:
                state["scaler"] = loss_scale
            save_checkpoint(run_dir, step, state, protect=protect)
        accelerator.wait_for_everyone()

    while step < total_steps:
        # --- discriminator step: G under no_grad, the loss's penalty inside it
        real, labels = reals.next()
        real = real.to(device)
        if config.dihedral:
            real = dihedral(real, latent_rng)
        real = real.contiguous(memory_format=TRAIN_LAYOUT)
        labels = labels.to(device) if spec.conditional else None
        real_in = spec.real_input(real, model)
        requires_grad(D, True)
        z = torch.randn(per_rank, config.latent_dim, generator=latent_rng).to(device)
        alpha = torch.rand(per_rank, generator=latent_rng).to(device)
        with torch.no_grad(), accelerator.autocast():
            fake_in = G(z, labels)
        with accelerator.autocast():
            loss_d, d_stats = d_loss(
                config.loss, critic(labels), real_in, fake_in, losses, step, alpha=alpha
            )
            if class_term is not None:
                class_loss, found = class_term.loss(real_in, labels)
                loss_d = loss_d + class_loss
                d_stats |= {"d_class_ce": found["ce"], "d_class_acc": found["accuracy"]}
        opt_D.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        average_gradients(D, accelerator)
        opt_D.step()
        if ada is not None:  # every rank moves p by the same, averaged r_t
            sign = torch.tensor([d_stats["real_sign"]], device=device)
            ada.observe(accelerator.reduce(sign, reduction="mean") if world > 1 else sign)

        # --- generator step: D frozen, so its weight gradients are not computed
        requires_grad(D, False)
        z = torch.randn(per_rank, config.latent_dim, generator=latent_rng).to(device)
        with accelerator.autocast():
            fake = G(z, labels)
            loss_g, g_stats = g_loss(config.loss, critic(labels), fake)
            if class_term is not None:
                class_loss, found = class_term.loss(fake, labels, G_CLASS_SHARE)
                loss_g = loss_g + class_loss
                g_stats |= {"g_class_ce": found["ce"], "g_class_acc": found["accuracy"]}
        opt_G.zero_grad(set_to_none=True)
        accelerator.backward(loss_g)
        average_gradients(G, accelerator)
        opt_G.step()
        # EMA half-life ramps up with training, as in StyleGAN2-ADA (ema_rampup 0.05)
        ema_images = min(config.ema_kimg * 1000, step * config.batch_size * 0.05)
        ema_beta = 0.5 ** (config.batch_size / max(ema_images, 1e-8))
        update_ema(G_ema, G, ema_beta)
        step += 1
        tick_images += config.batch_size

        # --- log, snapshot (grid, metric, checkpoint), checkpoint, stop on a signal
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
            if ada is not None:
                line["augment_p"] = round(ada.p, 4)
            if torch.cuda.is_available():
                line["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            history.append(line)
            if main:
                progress_print(line)
                _append_jsonl(run_dir / STATS, line)
            tick_start, tick_images = time.perf_counter(), 0
        snapshot = step % steps_of(config.snapshot_kimg) == 0 or done
        if main and snapshot:
            path = run_dir / "samples" / f"fakes-{step:09d}.png"
            write_grid(G_ema, grid_z, grid_labels, device, path)
            if metric is not None:
                measured = time.perf_counter()
                found = metric(G_ema, device)
                found = {"step": step, "kimg": round(step * config.batch_size / 1000, 3),
                         **found, "seconds": round(time.perf_counter() - measured, 2)}  # fmt: skip
                _append_jsonl(run_dir / METRIC_FILE, found)
                progress_print(metric_text(found))
                tick_start += found["seconds"]  # img/s counts training steps only
        stopping = any_rank(stop.received is not None, accelerator)
        if snapshot or step % steps_of(config.checkpoint_kimg) == 0 or stopping:
            best = best_metric_step(run_dir) if metric is not None else None
            checkpoint(protect=best[0] if best else None)
        if stopping and not done:
            if main:
                progress_print(
                    f"stopped by {stop.received or 'a signal'} at step {step}: checkpoint saved, "
                    "rerun with --resume auto to continue"
                )
            raise TrainingInterrupted(run_dir)
    accelerator.end_training()
    return run_dir


def metric_text(line: dict[str, Any]) -> str:
    """'snapshot 2.000 kimg: kid 3.1 recall 0.41 ... [class 1 collapsed: ...]'."""
    keys = ("kid", "precision", "recall", "coverage", "diversity", "class_accuracy",
            "synth_real_accuracy")  # fmt: skip
    parts = [f"{k} {line[k]:.3g}" for k in keys if line.get(k) is not None]
    text = f"snapshot {line['kimg']:.3f} kimg (texture features): " + "  ".join(parts)
    for label, reasons in line.get("collapsed", {}).items():
        text += f"  [class {label} collapsed: {'; '.join(reasons)}]"
    return text


class TrainingInterrupted(Exception):
    """A stop signal arrived; the state is checkpointed. The CLI exits with 143 (SIGTERM)."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


@torch.no_grad()
def write_grid(G: torch.nn.Module, z: torch.Tensor, labels, device, path: Path) -> None:
    labels = None if labels is None else labels.to(device)
    noise = torch.Generator().manual_seed(0)  # the same noise in every grid of a run
    images = G.sample(z.to(device), labels, noise).float().clamp(-1, 1)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    title = None
    if labels is not None:
        classes = sorted(set(labels.tolist()))
        title = "rows by class: " + ", ".join(f"class {c}" for c in classes)
    save_png(make_grid(list(pixels), scale=2, title=title), path)


def jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(text, object) of every whole line with a step; a line cut short by a kill inside an
    append (its last) or one that is not a step's object is left out."""
    found = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            found.append((text, line))
    return found


def truncate_stats(path: Path, step: int) -> None:
    """Keep the lines up to `step`: a resumed run repeats the steps after its checkpoint (and
    a torn last line of a killed run goes)."""
    if not path.exists():
        return
    kept = [text for text, line in jsonl_lines(path) if line["step"] <= step]
    atomic_write_bytes(path, "".join(text + "\n" for text in kept).encode())


def _append_jsonl(path: Path, line: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:  # append-only results, one JSON per line
        f.write(json.dumps(line) + "\n")
