"""The shard reader every later stage uses: a pool (optionally one class) as a stream of tensors."""

from __future__ import annotations

import json
import random
import re
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
    manifest_channels,
    verify_pool,
)
from synthbreast.errors import UserError

# What a damaged shard or sample raises while it is read: a deleted or unreadable file
# (OSError), a truncated tar or a bad label (ValueError), a missing member (KeyError), a corrupt
# PNG (PIL's UnidentifiedImageError is an OSError; a broken chunk can be a SyntaxError).
READ_ERRORS = (OSError, ValueError, KeyError, SyntaxError)


class ShardReadError(UserError):
    """A shard or a sample that cannot be read, named, with the next step: one line.

    A DataLoader worker's exception is raised again in the main process as `type(message)`,
    the message carrying the worker's whole traceback; the constructor keeps its last line,
    the original message, so the CLI still prints one line.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    # PIL names the in-memory buffer ("cannot identify image file <_io.BytesIO object at
    # 0x...>"), which says nothing to the user: the shard and key are named beside it
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)) or type(err).__name__


def to_uint8_tensor(img: Image.Image):
    """PIL RGB -> uint8 tensor [3, H, W], grey 'L' -> [1, H, W] (the reader's default)."""
    pixels = np.array(img)
    if pixels.ndim == 2:
        return torch.from_numpy(pixels).unsqueeze(0)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def folder_channels(shard_paths: list[Path]) -> int:
    """Channels of the samples, from the manifest beside the shards (3 when there is none:
    shards written before channels were recorded, or a folder built by hand)."""
    if not shard_paths:
        return 3
    try:
        return manifest_channels(load_manifest(Path(shard_paths[0]).parent))
    except UserError:
        return 3


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
    rank (`webdataset.split_by_node`; `by_rank=False` skips it) -> split by DataLoader worker
    (`split_by_worker`) -> tar members grouped into samples -> optional class filter ->
    optional buffer shuffle -> decode. Without `shuffle` the order is deterministic (manifest
    order, then tar order).
    Each sample: {"key", "image", "label", "patient", "shard" (the path it came from)}.

    Every sample is read exactly once per epoch when the split is by shard, so use at least
    ranks x workers shards per pool (ingest's --min-shards) or some workers stay idle.

    Images come as the folder stores them: 1-channel shards (mammograms) as grey [1, H, W],
    others as RGB [3, H, W]; `channels` forces one or the other (e.g. 3 for a model that
    needs RGB, the grey replicated).
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
        channels: int | None = None,
        by_rank: bool = True,
    ):
        super().__init__()
        self.urls = [str(p) for p in shard_paths]
        self.channels = channels if channels is not None else folder_channels(shard_paths)
        self.classes = None if classes is None else {int(c) for c in classes}
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.handler = handler
        self.by_rank = by_rank  # False: this process reads every shard, under torchrun too
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order for a new epoch (call before iterating, on every rank)."""
        self.epoch = epoch

    def _samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        """Raw samples of these shards; a shard that fails to read goes to the handler
        (webdataset's convention: return True to go on with the next shard, or raise); without
        one, a ShardReadError names the shard."""
        for url in urls:
            try:
                yield from iter_shard(Path(url))
            except Exception as err:
                if self.handler is not None and self.handler(err):
                    continue
                if not isinstance(err, READ_ERRORS):
                    raise
                inspect = f"check the folder with `synthbreast inspect {Path(url).parent}`"
                if isinstance(err, FileNotFoundError):
                    raise ShardReadError(
                        f"shard {url} is gone (deleted or moved while the job ran): restore it, "
                        f"then {inspect}"
                    ) from err
                raise ShardReadError(
                    f"shard {url} cannot be read ({_reason(err)}): {inspect}"
                ) from err

    def _label(self, sample: dict[str, Any]) -> int | None:
        """The sample's class, or None when the handler skips a bad one."""
        try:
            return int(sample["cls"])
        except READ_ERRORS as err:
            return self._bad_sample(sample, "class label", err)

    def _bad_sample(self, sample: dict[str, Any], what: str, err: BaseException) -> None:
        """None when the handler says go on (the sample is skipped), else ShardReadError."""
        if self.handler is not None and self.handler(err):
            return None
        url = sample.get("__url__", "?")
        raise ShardReadError(
            f"shard {url}, sample {sample.get('__key__')!r}: the {what} cannot be read "
            f"({_reason(err)}); the shard is damaged: check the folder with "
            f"`synthbreast inspect {Path(url).parent}`"
        ) from err

    def __iter__(self) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        if self.by_rank:
            urls = wds.split_by_node(urls)
        urls = list(wds.split_by_worker(urls))
        samples = self._samples(urls)
        if self.classes is not None:
            samples = (s for s in samples if self._label(s) in self.classes)
        if self.shuffle:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        for sample in samples:
            label = self._label(sample)
            if label is None:
                continue
            try:
                meta = json.loads(sample["json"])
            except READ_ERRORS as err:
                self._bad_sample(sample, "metadata (.json)", err)
                continue
            try:
                image = decode_image(image_bytes(sample), self.channels)
            except READ_ERRORS as err:
                self._bad_sample(sample, "image", err)
                continue
            yield {
                "key": sample["__key__"],
                "image": self.transform(image),
                "label": label,
                "patient": str(meta.get("patient", "")),
                "shard": sample["__url__"],
            }


def find_unreadable(shard_paths: list[Path]) -> None:
    """Read and decode every sample of these shards: the first one that fails raises its
    ShardReadError (for code that read them without saying where, e.g. the snapshot metric)."""
    for _ in ShardDataset(shard_paths, transform=lambda image: None):
        pass


def shard_dataset(root: Path, pool: str, **kwargs: Any) -> ShardDataset:
    """The reader of one pool of a shard folder: `shard_dataset(root, "gan", classes=[1])`.
    The folder must be complete and the pool's shards match their sha256 (`verify_pool`)."""
    manifest = load_manifest(root)
    return ShardDataset(verify_pool(root, manifest, pool), **kwargs)
