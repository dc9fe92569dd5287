"""The shard format every stage shares: schema, atomic writer, manifest, verification.

A shard is a plain tar file of samples, read with webdataset. A sample is
`<key>.png` (the image bytes as they were), `<key>.cls` (the class as ASCII digits) and
`<key>.json` (patient, x, y, original path, ...). `manifest.json` beside the shards lists every
shard with its pool, sample counts and sha256. The reader is `synthbreast.data.reader`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from synthbreast.errors import UserError
from synthbreast.fileio import atomic_write_json, fsync_dir, read_json, sha256_file, temp_name
from synthbreast.images import to_8bit
from synthbreast.results import MANIFEST

SCHEMA = "synthbreast-shards/1"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "bmp")


@dataclass(frozen=True)
class Sample:
    """One sample as written: the image bytes, their extension, the class and metadata."""

    key: str
    image: bytes
    label: int
    meta: dict[str, Any]
    ext: str = "png"


# --- writing ---------------------------------------------------------------------------


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (no mtime, owner or mode from the machine) so equal samples give equal
    # bytes: a shard can be rebuilt bit for bit and its checksum compared.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: Path,
    samples: Iterable[Sample],
    before_rename: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Write samples to `path` atomically (temp name, fsync, rename); return its manifest entry.

    `before_rename(entry)` runs once the temp file is whole and hashed but before it takes
    its final name: record the entry in the manifest there, so that any shard under its final
    name is already listed with its checksum, whenever the process dies.
    """
    path = Path(path)
    tmp = temp_name(path)
    count, counts = 0, {}
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for sample in samples:
                    if "." in sample.key:
                        raise ValueError(f"sample key {sample.key!r} must not contain '.'")
                    _add_member(tar, f"{sample.key}.{sample.ext}", sample.image)
                    _add_member(tar, f"{sample.key}.cls", str(sample.label).encode())
                    meta = json.dumps(sample.meta, sort_keys=True).encode()
                    _add_member(tar, f"{sample.key}.json", meta)
                    count += 1
                    counts[str(sample.label)] = counts.get(str(sample.label), 0) + 1
            f.flush()
            os.fsync(f.fileno())
        entry = {
            "name": path.name,
            "count": count,
            "counts": dict(sorted(counts.items())),
            "sha256": sha256_file(tmp),
            "bytes": tmp.stat().st_size,
        }
        if before_rename is not None:
            before_rename(entry)
        tmp.replace(path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return entry


# --- the manifest ----------------------------------------------------------------------


def load_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise UserError(f"{root} does not exist or is not a folder of shards")
    if not path.is_file():
        raise UserError(
            f"{path} not found: {root} is not a synthbreast shard folder "
            "(make one with `synthbreast ingest SRC OUT`)"
        )
    try:
        manifest = read_json(path)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON ({err}); rerun the ingest with --overwrite"
        ) from err
    if manifest.get("schema") != SCHEMA:
        raise UserError(f"{path} has schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    return manifest


def save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(root) / MANIFEST, manifest)


def pool_names(manifest: dict[str, Any]) -> list[str]:
    return list(manifest["pools"])


def pool_shards(root: Path, manifest: dict[str, Any], pool: str) -> list[Path]:
    """The shard paths of one pool, in manifest order; a clear error for an unknown/empty pool."""
    if pool not in manifest["pools"]:
        known = ", ".join(manifest["pools"]) or "none"
        raise UserError(f"{root} has no pool {pool!r} (pools: {known})")
    names = [s["name"] for s in manifest["shards"] if s["pool"] == pool]
    if not names:
        raise UserError(f"pool {pool!r} in {root} has no shards: was the ingest complete?")
    return [Path(root) / name for name in names]


def pool_count(manifest: dict[str, Any], pool: str, classes: Iterable[int] | None = None) -> int:
    """Samples in a pool (optionally only some classes), from the manifest alone."""
    wanted = None if classes is None else {str(c) for c in classes}
    total = 0
    for shard in manifest["shards"]:
        if shard["pool"] == pool:
            total += sum(n for c, n in shard["counts"].items() if wanted is None or c in wanted)
    return total


def verify_shards(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found comparing the shard files with the manifest (empty list = all verified)."""
    root = Path(root)
    problems = []
    listed = {s["name"] for s in manifest["shards"]}
    for shard in manifest["shards"]:
        if (problem := shard_problem(root, shard)) is not None:
            problems.append(f"{root / shard['name']}: {problem}")
    for path in sorted(root.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path}: not in the manifest")
    if manifest.get("status") != "complete":
        problems.append(f"{root / MANIFEST}: status is {manifest.get('status')!r}, not 'complete'")
    return problems


def shard_problem(root: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with one listed shard's file (missing, size, sha256), or None when intact.
    The one shard check: ingest, generate, import-synthetic and every reader use it."""
    path = Path(root) / entry["name"]
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, the manifest says {entry['bytes']}"
    if sha256_file(path) != entry["sha256"]:
        return "sha256 differs from the manifest (the shard changed or is damaged)"
    return None


def verify_pool(root: Path, manifest: dict[str, Any], pool: str) -> list[Path]:
    """The shard paths of one pool, once the folder is complete and every shard of the pool
    matches its size and sha256 in the manifest; else a UserError naming the first bad shard,
    with `synthbreast inspect` as the next step. Readers run it before they read a pool."""
    root = Path(root)
    if pool in manifest["pools"]:
        written = sum(1 for s in manifest["shards"] if s["pool"] == pool)
        planned = len(manifest["pools"][pool].get("shards") or []) or written
    # `ingest --resume` and a rerun of `generate` keep the intact shards and redo the rest
    if manifest.get("source", {}).get("synthetic"):
        redo = "rerun the same `synthbreast generate` command"
    else:
        redo = f"`synthbreast ingest SRC {root} --resume`"
    inspect = f"`synthbreast inspect {root}`"
    if pool in manifest["pools"] and manifest.get("status") != "complete":
        raise UserError(
            f"{root} is not complete (status {manifest.get('status')!r}: {written} of {planned} "
            f"shards of pool {pool!r} written): check it with {inspect}, then finish it with "
            f"{redo}"
        )
    paths = pool_shards(root, manifest, pool)  # a clear error for an unknown or empty pool
    bad = []
    for entry in manifest["shards"]:
        if entry["pool"] == pool and (problem := shard_problem(root, entry)) is not None:
            bad.append(f"{root / entry['name']}: {problem}")
    if bad:
        more = f" (and {len(bad) - 1} more shards)" if len(bad) > 1 else ""
        raise UserError(
            f"{bad[0]}{more}: check it with {inspect}, then redo the damaged shards with {redo}"
        )
    return paths


def _tar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of the regular files in a tar held in memory.

    Reads the 512-byte headers directly: `tarfile` spends as long per member as decoding a
    50x50 PNG takes. Handles ustar names with prefix, pax `path` records and GNU long names,
    which covers what `write_shard` (and webdataset's writer) produce.
    """
    offset, size_of_data = 0, len(data)
    long_name: str | None = None
    while offset + 512 <= size_of_data:
        header = data[offset : offset + 512]
        if header.count(0) == 512:
            return  # end-of-archive marker
        size_field = header[124:136].rstrip(b"\0 ").decode() or "0"
        size = int(size_field, 8)
        kind = header[156:157]
        if offset + 512 + size > size_of_data:
            raise ValueError("truncated tar: a member runs past the end of the file")
        body = data[offset + 512 : offset + 512 + size]
        offset += 512 + -(-size // 512) * 512
        if kind == b"x":  # pax extended header: "<len> key=value\n" records
            for record in body.decode("utf-8").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
            continue
        if kind == b"L":  # GNU long name
            long_name = body.rstrip(b"\0").decode("utf-8")
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue  # directories, links: not samples
        name = long_name
        if name is None:
            name = header[0:100].rstrip(b"\0").decode("utf-8")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8")
            if prefix:
                name = f"{prefix}/{name}"
        long_name = None
        yield name, body
    raise ValueError("truncated tar: no end-of-archive marker")


def iter_shard(path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as dicts {'__key__', 'png', 'cls', 'json', '__url__'} of bytes.

    Members are grouped as webdataset groups them: consecutive files sharing a key, the key
    being the name up to the first dot of its last path component.
    """
    with open(path, "rb") as f:
        data = f.read()
    sample: dict[str, Any] = {}
    for name, content in _tar_members(data):
        folder, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if sample and key != sample["__key__"]:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample["__url__"] = str(path)
        sample[ext] = content
    if sample:
        yield sample


def image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} has no image member")


def decode_image(data: bytes, channels: int = 3) -> Image.Image:
    """Image bytes -> an RGB PIL image (grey or RGBA sources become RGB), or with channels=1 a
    grey 'L' one (what 1-channel shards hold)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    mode = "L" if channels == 1 else "RGB"
    # convert() copies even when the mode is already right: skip it for RGB (the usual case)
    return img if img.mode == mode else to_8bit(img).convert(mode)


def manifest_channels(manifest: dict[str, Any]) -> int:
    """Channels of a folder's samples: 1 or 3 (folders written before channels were kept: 3)."""
    return int(manifest.get("sample", {}).get("channels") or 3)


def manifest_classes(manifest: dict[str, Any]) -> list[str]:
    """The class names of a folder, index = label (2 for IDC, 3 for healthy/benign/malignant)."""
    return list(manifest["source"]["class_names"])
