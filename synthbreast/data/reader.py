"""The shard reader every later stage uses: a pool (optionally one class) as a stream of tensors."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from synthbreast.data.shards import (
    decode_image,
    image_bytes,
    iter_shard,
    load_manifest,
    pool_shards,
)


def to_uint8_tensor(img: Image.Image):
    """PIL RGB -> uint8 tensor [3, H, W] (the reader's default transform)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream with a fixed-size buffer (mixes samples across the shards being read)."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream the samples of some shards, each exactly once per epoch across ranks and workers.

    Stages: shard list (shuffled by seed and epoch, identically on every rank) -> split by
    rank (`webdataset.split_by_node`) -> split by DataLoader worker (`split_by_worker`) ->
    tar members grouped into samples -> optional class filter -> optional buffer shuffle ->
    decode. Without `shuffle` the order is deterministic (manifest order, then tar order).

    Every sample is read exactly once per epoch when the split is by shard, so use at least
    ranks x workers shards per pool (ingest's --min-shards) or some workers stay idle.
    """

    def __init__(
        self,
        shard_paths: list[Path],
        *,
        classes: Iterable[int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        transform: Callable[[Image.Image], Any] = to_uint8_tensor,
        handler: Callable[[Exception], bool] | None = None,
    ):
        super().__init__()
        self.urls = [str(p) for p in shard_paths]
        self.classes = None if classes is None else {int(c) for c in classes}
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.handler = handler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order for a new epoch (call before iterating, on every rank)."""
        self.epoch = epoch

    def _samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        """Raw samples of these shards; a shard that fails to read goes to the handler
        (webdataset's convention: return True to go on with the next shard, or raise)."""
        for url in urls:
            try:
                yield from iter_shard(Path(url))
            except Exception as err:
                if self.handler is None or not self.handler(err):
                    raise

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        urls = list(wds.split_by_worker(wds.split_by_node(urls)))
        samples = self._samples(urls)
        if self.classes is not None:
            samples = (s for s in samples if int(s["cls"]) in self.classes)
        if self.shuffle:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        for sample in samples:
            meta = json.loads(sample["json"])
            yield {
                "key": sample["__key__"],
                "image": self.transform(decode_image(image_bytes(sample))),
                "label": int(sample["cls"]),
                "patient": str(meta.get("patient", "")),
            }


def shard_dataset(root: Path, pool: str, **kwargs: Any) -> ShardDataset:
    """The reader of one pool of a shard folder: `shard_dataset(root, "gan", classes=[1])`."""
    manifest = load_manifest(root)
    return ShardDataset(pool_shards(root, manifest, pool), **kwargs)
