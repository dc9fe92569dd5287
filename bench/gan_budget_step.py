"""Training speed of the GAN choices at a budget: img/s of the real training loop.

Runs `train_gan` itself (data loading, augmentation, losses, EMA, everything but the snapshot
metric) for each variant on the same shards, alternating the variants over rounds so that
load from other work on the machine hits all of them alike, and prints img/s per variant with
its ratio to the first one (the peer in the same run). The first tick of each run (start-up,
worker fork) is left out.

    python bench/gan_budget_step.py --shards SHARDS [--budget small] [--kimg 1.0] [--rounds 2]
        [--variants choices|speed] [--only TEXT ...]

`choices` (default): the model, loss, augmentation and generator options one at a time.
`speed`: the budget's default against its layout and penalty before (NCHW, the penalty every
step: the `small` step issue 16 started from), torch's fused Adam, and the options that change
its arithmetic per image (a larger batch, bf16 autocast), to see which buy more kimg in the
same minutes.

SHARDS: an ingest output (e.g. `synthbreast demo-data d && synthbreast ingest d SHARDS`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from synthbreast.config import TrainGANConfig
from synthbreast.train import gan
from synthbreast.train.gan import apply_budget, train_gan

# (label, overrides of the budget): the model, the loss and the augmentation, one at a time
VARIANTS = [
    ("msggan (per class), wgan-gp, no aug", dict(model="msggan", class_label=0,
                                               loss="wgan-gp", augment="none")),
    ("msggan-cond, wgan-gp, no aug", dict(model="msggan-cond", loss="wgan-gp", augment="none")),
    ("msggan-cond, wgan-gp, diffaug", dict(model="msggan-cond", loss="wgan-gp",
                                           augment="diffaug")),
    ("msggan-cond, logistic-r1, no aug", dict(model="msggan-cond", loss="logistic-r1",
                                              augment="none")),
    ("msggan-cond, logistic-r1, diffaug", dict(model="msggan-cond", loss="logistic-r1",
                                               augment="diffaug")),
    ("msggan-cond, G 32 channels at 64 px", dict(model="msggan-cond", g_fmap_min=32)),
    ("msggan-cond, label modulates G's blocks", dict(model="msggan-cond",
                                                    g_condition="modulate")),
    ("msggan-cond, AC class loss (--class-weight 1)", dict(model="msggan-cond",
                                                          class_weight=1.0)),
    ("budget default", dict(model="msggan-cond")),
]  # fmt: skip
# The budget's default G and D, with one option changed at a time. "layout" and "adam" are
# not config fields: train-gan always runs channels_last (gan.TRAIN_LAYOUT) and torch's CPU
# default Adam, a loop over the tensors (gan.OPTIMIZERS); the bench sets NCHW and torch's
# fused Adam to time them (README, Speed: why fused Adam once broke bit-exact resume).
NCHW = torch.contiguous_format
FUSED_ADAM = lambda params, lr: torch.optim.Adam(  # noqa: E731
    params, lr=lr, betas=(0.0, 0.99), eps=1e-8, fused=True
)
SPEED_VARIANTS = [
    ("budget default (channels_last)", dict(model="msggan-cond")),
    ("fused Adam (not the default)", dict(model="msggan-cond", adam=FUSED_ADAM)),
    ("NCHW layout", dict(model="msggan-cond", layout=NCHW)),
    ("gp every step", dict(model="msggan-cond", gp_interval=1)),
    ("NCHW + gp every step (issue 16's base)", dict(model="msggan-cond", gp_interval=1,
                                                    layout=NCHW)),
    ("batch 16", dict(model="msggan-cond", batch_size=16)),
    ("bf16 autocast", dict(model="msggan-cond", mixed_precision="bf16")),
]  # fmt: skip


def img_per_s(shards: Path, budget: str, kimg: float, overrides: dict, outdir: Path) -> float:
    overrides = dict(overrides)
    layout = overrides.pop("layout", torch.channels_last)
    adam = overrides.pop("adam", gan.OPTIMIZERS["adam"])
    model = overrides.pop("model", TrainGANConfig.model)  # before the budget (CONDITIONAL_ONLY)
    config = TrainGANConfig(shards=str(shards), outdir=str(outdir), model=model)
    config = apply_budget(config, budget)
    config = replace(config, kimg=kimg, tick_kimg=kimg / 5, snapshot_kimg=kimg,
                     checkpoint_kimg=kimg, metric_images=0, **overrides)  # fmt: skip
    # accelerate keeps one state per process: a variant with another precision needs it anew
    AcceleratorState._reset_state(reset_partial_state=True)
    defaults = gan.TRAIN_LAYOUT, gan.OPTIMIZERS["adam"]
    gan.TRAIN_LAYOUT, gan.OPTIMIZERS["adam"] = layout, adam
    try:
        run = train_gan(config, progress_print=lambda _: None)
    finally:
        gan.TRAIN_LAYOUT, gan.OPTIMIZERS["adam"] = defaults
    ticks = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    return statistics.mean(t["img_per_s"] for t in ticks[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--budget", default="small")
    parser.add_argument("--kimg", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", choices=("choices", "speed"), default="choices")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="time only the variants whose label contains TEXT (repeatable); "
        "the first of them is the one the others are compared with",
    )
    args = parser.parse_args()
    variants = SPEED_VARIANTS if args.variants == "speed" else VARIANTS
    if args.only:
        variants = [v for v in variants if any(text in v[0] for text in args.only)]
        if not variants:
            parser.error(f"--only {args.only}: no variant label contains it")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, budget {args.budget}")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = dict(variants)

        def measure(label: str, round_index: int, index: int) -> float:
            outdir = Path(tmp) / f"r{round_index}-v{index}"
            return img_per_s(args.shards, args.budget, args.kimg, overrides[label], outdir)

        alternate([label for label, _ in variants], args.rounds, measure, "variant", 40)


def alternate(
    labels: list[str],
    rounds: int,
    measure: Callable[[str, int, int], float],
    heading: str,
    width: int,
) -> dict[str, list[float]]:
    """Time every setting once per round, in the same order each round (so that load from
    other work hits all alike): `measure(label, round, index)` returns img/s. Prints each
    figure as it comes, then the table with each setting's ratio to the first."""
    found: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(rounds):
        for index, label in enumerate(labels):
            found[label].append(measure(label, round_index, index))
            print(f"  round {round_index}: {label}: {found[label][-1]:.1f} img/s", flush=True)
    first = statistics.mean(found[labels[0]])
    print(f"{heading:{width}s} {'img/s per round':>24s} {'mean':>8s} {'vs first':>9s}")
    for label, values in found.items():
        rounds_text = " ".join(f"{v:6.1f}" for v in values)
        mean = statistics.mean(values)
        print(f"{label:{width}s} {rounds_text:>24s} {mean:8.1f} {mean / first:8.2f}x")
    return found


if __name__ == "__main__":
    main()
