"""Run under torchrun by test_train_gan.py: the real `synthbreast train-gan` CLI in every rank,
with two of the loop's own functions wrapped to watch them (each still does its work):

- `average_gradients(module, accelerator)`: every rank's gradients before the all-reduce are
  gathered, and after it the module's gradients are compared with their mean;
- `update_ema(G_ema, G, beta)` (once per step, after both optimizer steps): a sha256 of D's, G's
  and G_ema's weights, gathered from every rank.

Writes OUT/rank<r>.json: the gradient checks, and the weight hashes of every rank per step.
Usage: python -m torch.distributed.run --nproc_per_node 2 tests/dist_train_probe.py OUT ARGS...
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from synthbreast.cli import app
from synthbreast.train import gan

average_gradients, update_ema = gan.average_gradients, gan.update_ema
nets: list[torch.nn.Module] = []  # D and G, in the order the loop first averages them
grad_checks: list[dict] = []
weight_hashes: list[list[str]] = []  # per step: the hash of every rank


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def watched_average(module: torch.nn.Module, accelerator) -> None:
    if len(nets) < 2 and all(module is not n for n in nets):
        nets.append(module)
    local = flat_grads(module).clone()
    every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)
    average_gradients(module, accelerator)
    averaged, mean = flat_grads(module), torch.stack(every).sum(0) / len(every)
    grad_checks.append(
        {
            "net": "D" if module is nets[0] else "G",
            "equal_to_mean": bool(torch.equal(averaged, mean)),
            "max_difference": float((averaged - mean).abs().max()),
            "ranks_differ": not all(torch.equal(every[0], g) for g in every[1:]),
        }
    )


def weights_sha256(*modules: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def watched_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    update_ema(G_ema, G, beta)
    hashes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, weights_sha256(*nets, G_ema))
    weight_hashes.append(hashes)


def main(out: Path, args: list[str]) -> int:
    gan.average_gradients, gan.update_ema = watched_average, watched_ema
    try:
        app(args)
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    rank = int(os.environ["RANK"])  # torchrun's (the group may be gone by now)
    record = {"exit": code, "grads": grad_checks, "weights": weight_hashes}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return int(code)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
