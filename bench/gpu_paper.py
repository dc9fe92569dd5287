"""The paper config of synthbreast's MSG-GAN on a GPU, in one call: speed, MFU, the penalty under
bf16, and a short real training. Prepared for a session that is lent a GPU (bench/gpu_run.sh).

    bash bench/gpu_run.sh                                  # on the GPU machine, about 8 minutes
    python bench/gpu_paper.py --out DIR                    # the same, results in DIR
    python bench/gpu_paper.py --smoke --out /tmp/gpu-smoke # tiny sizes on the CPU, seconds

Stages (each result is appended to results.json as soon as it exists, so a cut-short run
keeps what it measured; results.md is the table for the README):
1. speed: the training step of bench/peer_msggan.py (train/gan.py's step: one D step with
   WGAN-GP 10, one G step, the EMA; RMSprop 1e-4, 64 px, 5 blocks, 512 channels, latent 512)
   at batch 16, 64 and 256 in fp32 (TF32 off: true fp32), bf16 autocast (the penalty's D
   pass stays fp32 by design) and bf16 with torch.compile (G compiled; D too is tried first,
   the penalty's double backward may refuse it): img/s, s/kimg, peak
   torch.cuda.max_memory_allocated, and MFU = counted FLOPs/img x img/s / the GPU's dense bf16
   peak (a table of known peaks by device name; unknown: n/a);
2. penalty: the gradient penalty of one batch in fp32 against the same batch under bf16
   autocast, both as training runs it (D pass in fp32) and with the D pass in bf16 too;
3. training: `synthbreast ingest` of the real sample (--small-patches pad), then train-gan at
   the paper width for about --train-seconds, its kimg chosen from the measured speed; the
   tick lines (losses, Wasserstein estimate) and the snapshot texture metric show it learns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch
from msggan_step import CountFlops
from peer_msggan import SelfStep, Settings

from synthbreast.train.losses import gradient_penalty

REAL_SAMPLE = "/work/shared/real-sample/idc"

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name;
# checked in order, so "A100" comes before "A10"
BF16_PEAKS = [
    ("B200", 2250e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 tensor cores: V100 has no bf16
]

MODES = {
    "fp32": dict(bf16=False, compile=""),
    "bf16": dict(bf16=True, compile=""),
    "bf16+compile": dict(bf16=True, compile="GD"),
}


def bf16_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAKS:
        if key in name:
            return name, peak
    return name, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Results:
    """results.json rewritten after every entry (atomic rename), so nothing measured is lost."""

    def __init__(self, out: Path, header: dict) -> None:
        self.path, self.data = out / "results.json", {**header, "speed": [], "errors": []}
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


# --- 1. speed ------------------------------------------------------------------------------


D_COMPILE_FAILED: list[str] = []  # why D could not be compiled, once found: not retried


def measure_speed(settings: Settings, seconds: float, warmup: int) -> dict:
    """img/s of one step config; falls back from compiling G and D to G alone."""
    device = torch.device(settings.device)
    if settings.compile == "GD" and D_COMPILE_FAILED:
        settings = replace(settings, compile="G")
    note = f"D not compiled: {D_COMPILE_FAILED[0]}" if D_COMPILE_FAILED else ""
    step = SelfStep(settings)
    try:
        for _ in range(warmup):
            step()
    except Exception as err:
        if settings.compile != "GD":
            raise
        D_COMPILE_FAILED.append(f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
        note = f"D not compiled: {D_COMPILE_FAILED[0]}"
        torch._dynamo.reset()
        step = SelfStep(replace(settings, compile="G"))
        for _ in range(warmup):
            step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        step()
        iters += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iters >= 3:
            break
    img_s = iters * settings.batch / elapsed
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"img_s": img_s, "s_per_kimg": 1000 / img_s, "iters": iters, "peak_gib": memory,
            "compiled": step.settings.compile or "none", "note": note}  # fmt: skip


def flops_per_image(settings: Settings) -> float:
    """FLOPs of one full iteration (fp32, eager) / batch: the same work in every mode."""
    step = SelfStep(replace(settings, bf16=False, compile=""))
    step()  # warm-up outside the counter
    with CountFlops() as counter:
        step()
    return counter.total / settings.batch


# --- 2. the penalty under bf16 ------------------------------------------------------------------


def penalty_check(settings: Settings) -> dict:
    """Penalty and per-sample norms of one batch: fp32 vs bf16 autocast (D pass fp32, as
    training runs it) vs bf16 autocast with the D pass in bf16 too."""
    torch.manual_seed(1)
    step = SelfStep(settings)
    for _ in range(3):  # a few steps, so D is not at its initialisation
        step()
    device = step.device
    with torch.no_grad():
        fake = step.G(torch.randn(settings.batch, settings.latent, device=device))
    alpha = torch.rand(settings.batch, device=device)
    fp32, norms32 = gradient_penalty(step.D, step.real, fake, settings.gp_weight, alpha)
    out = {"fp32": fp32.item(), "grad_norm_mean_fp32": norms32.mean().item()}
    for name, full in (("bf16_autocast_d_fp32", True), ("bf16_autocast_d_bf16", False)):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            value, norms = gradient_penalty(
                step.D, step.real, fake, settings.gp_weight, alpha, full_precision=full
            )
        out[name] = value.item()
        out[f"{name}_rel_error"] = abs(value.item() - fp32.item()) / max(abs(fp32.item()), 1e-12)
        out[f"{name}_norm_max_rel_error"] = ((norms.float() - norms32).abs() / norms32).max().item()
    return out


# --- 3. a short real training -------------------------------------------------------------------


def real_training(
    args: argparse.Namespace, settings: Settings, img_s: float, seconds: float
) -> dict:
    """Ingest the real sample, then train-gan at the paper width for about `seconds`.
    Shards and the run folder go to --work (not --out: only a few files come back)."""
    from synthbreast.config import TrainGANConfig
    from synthbreast.train.gan import train_gan

    shards, smoke = args.work / "real-shards", args.smoke
    if not (shards / "manifest.json").is_file():
        cli = [sys.executable, "-m", "synthbreast"]
        command = [*cli, "ingest", str(args.real), str(shards), "--small-patches", "pad"]
        subprocess.run(command, check=True)
    kimg = max(img_s * seconds / 1000, 0.05)
    config = TrainGANConfig(
        shards=str(shards),
        outdir=str(args.work / "train"),
        resolution=settings.resolution,
        latent_dim=settings.latent,
        width=1.0 if not smoke else settings.channels / 512,
        batch_size=settings.batch,
        mixed_precision="bf16" if settings.bf16 else "no",
        kimg=round(kimg, 3),
        tick_kimg=round(kimg / 10, 3),
        snapshot_kimg=round(kimg / 4, 3),
        checkpoint_kimg=round(kimg, 3),
        metric_images=0 if smoke else 500,
        grid_size=16,
        workers=2 if smoke else 8,
    )
    lines = []
    start = time.perf_counter()
    run_dir = train_gan(config, progress_print=lambda line: lines.append(line))
    wall = time.perf_counter() - start
    grids = sorted((Path(run_dir) / "samples").glob("fakes-*.png"))
    if grids:  # the last sample grid comes back with the results
        shutil.copyfile(grids[-1], args.out / "training-grid.png")
    metrics = []
    for path in sorted(Path(run_dir).glob("metric-*.jsonl")):
        metrics += [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
    return {"run_dir": str(run_dir), "config": asdict(config), "seconds": wall,
            "ticks": [x for x in lines if isinstance(x, dict)], "metrics": metrics}  # fmt: skip


# --- the table ----------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    rows = [
        f"GPU: {data['device_name']}; torch {data['torch']}; dense bf16 peak "
        f"{data['bf16_peak_tflops'] or 'n/a'} TFLOP/s; {data['gflop_per_img']:.1f} GFLOP per "
        "image per iteration (counted); command: `bash bench/gpu_run.sh`",
        "",
        "| batch | mode | img/s | s/kimg | peak memory | MFU | compiled |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in data["speed"]:
        mem = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "n/a"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        rows.append(
            f"| {r['batch']} | {r['mode']} | {r['img_s']:,.4g} | {r['s_per_kimg']:,.4g} | {mem} "
            f"| {mfu} | {r['compiled']} |"
        )
    if "penalty" in data:
        p = data["penalty"]
        rows += [
            "",
            f"Gradient penalty, one batch: fp32 {p['fp32']:.6g}; bf16 autocast as trained "
            f"(D pass fp32) {p['bf16_autocast_d_fp32']:.6g} (rel. error "
            f"{p['bf16_autocast_d_fp32_rel_error']:.1e}); D pass in bf16 too "
            f"{p['bf16_autocast_d_bf16']:.6g} (rel. error "
            f"{p['bf16_autocast_d_bf16_rel_error']:.1e})",
        ]
    if "training" in data:
        t = data["training"]
        first, last = t["ticks"][0], t["ticks"][-1]
        keys = ("kimg", "img_per_s", "wasserstein", "gp", "g_loss")
        rows += [
            "",
            f"Real training, {t['seconds']:.0f} s, batch {t['config']['batch_size']}, "
            f"{t['config']['mixed_precision']}: first tick "
            + ", ".join(f"{k} {first.get(k)}" for k in keys)
            + "; last tick "
            + ", ".join(f"{k} {last.get(k)}" for k in keys),
        ]
        for m in t["metrics"]:
            rows.append(f"- snapshot metric: {json.dumps(m)[:200]}")
    for e in data["errors"]:
        rows.append(f"- error: {e}")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device, seconds")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="[16 64 256]")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--seconds", type=float, default=None, help="timed per config [5]")
    parser.add_argument("--train-seconds", type=float, default=None, help="real training [120]")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--real", type=Path, default=Path(REAL_SAMPLE), help="sample to ingest")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-paper-work"))
    parser.add_argument("--budget", type=float, help="stage 1 stops after [270 s; smoke: none]")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    base = Settings(device=str(device))
    batches, seconds, warmup, train_seconds = [16, 64, 256], 5.0, 3, 120.0
    if args.smoke:
        base = replace(Settings.small(), device=str(device))
        batches, seconds, warmup, train_seconds = [2, 4], 0.2, 1, 5.0
    budget = args.budget or (float("inf") if args.smoke else 270.0)
    batches = args.batches or batches
    seconds = args.seconds or seconds
    train_seconds = args.train_seconds or train_seconds
    name, peak = bf16_peak(device)
    started = time.perf_counter()

    results = Results(args.out, {
        "device_name": name, "torch": torch.__version__, "smoke": args.smoke,
        "bf16_peak_tflops": peak / 1e12 if peak else None, "settings": asdict(base),
        "tf32": False, "gflop_per_img": 0.0,
    })  # fmt: skip
    flops = flops_per_image(replace(base, batch=batches[0]))
    results.data["gflop_per_img"] = flops / 1e9
    print(f"{name}: {flops / 1e9:.2f} GFLOP/img/iteration; peak bf16 {peak or 'n/a'}", flush=True)

    # 1. speed
    # eager modes first, then the compiled ones from the largest batch (compiling is slow)
    eager = [(b, m) for b in batches for m in args.modes if not MODES[m]["compile"]]
    compiled = [(b, m) for b in reversed(batches) for m in args.modes if MODES[m]["compile"]]
    for batch, mode in eager + compiled:
        if time.perf_counter() - started > budget:
            results.data["errors"].append(f"batch {batch} {mode}: skipped, over --budget")
            continue
        settings = replace(base, batch=batch, **MODES[mode])
        try:
            r = measure_speed(settings, seconds, warmup)
        except Exception as err:
            results.data["errors"].append(f"batch {batch} {mode}: {type(err).__name__}: {err}")
            traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        r.update(batch=batch, mode=mode, mfu=flops * r["img_s"] / peak if peak else None)
        results.data["speed"].append(r)
        results.save()
        print(json.dumps(r), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 2. the penalty under bf16, 3. a short real training (best effort: errors recorded);
    # the training's length in kimg comes from the bf16 speed at its batch
    train_settings = replace(base, batch=args.train_batch if not args.smoke else 4, bf16=True)
    bf16_rows = [r for r in results.data["speed"] if r["mode"] == "bf16"]
    same = [r for r in bf16_rows if r["batch"] == train_settings.batch] or bf16_rows
    train_img_s = same[0]["img_s"] if same else 10.0
    stages = [
        ("penalty", lambda: penalty_check(replace(base, batch=batches[0]))),
        ("training", lambda: real_training(args, train_settings, train_img_s, train_seconds)),
    ]
    for key, stage in stages:
        try:
            results.data[key] = stage()
        except Exception as err:
            results.data["errors"].append(f"{key}: {type(err).__name__}: {err}")
            traceback.print_exc()
        results.save()

    (args.out / "results.md").write_text(markdown(results.data))
    print(markdown(results.data))
    print(
        f"written: {results.path}, {args.out / 'results.md'} "
        f"({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
