"""Run under torchrun by test_reader.py: each rank reads every shard of a folder with 2
DataLoader workers, shuffled and in plain order, and writes which keys it got, from which
worker, to OUT/rank<r>-<order>.json (one launch for both orders: torchrun's start-up is most
of the test's time)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from synthbreast.data.reader import ShardDataset
from synthbreast.data.shards import load_manifest


def worker_id(_image) -> int:
    info = torch.utils.data.get_worker_info()
    return -1 if info is None else info.id


def main(shards: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [s["name"] for s in load_manifest(shards)["shards"]]
    for order in ("shuffle", "plain"):
        dataset = ShardDataset(
            [shards / n for n in names], shuffle=order == "shuffle", transform=worker_id
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        epochs = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            epochs.append([(s["key"], int(s["image"])) for s in loader])
        result = {"world": world, "epochs": epochs}
        (out / f"rank{rank}-{order}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
