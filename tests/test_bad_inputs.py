"""Bad input, alone and mixed with good files: a clear error naming the file, or skip and count."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from synthbreast.config import IngestConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.shards import iter_shard, load_manifest
from synthbreast.errors import UserError

from .conftest import DEMO_PATIENTS, DEMO_PER_CLASS

GOOD_TOTAL = DEMO_PATIENTS * DEMO_PER_CLASS * 2


def _victim(src: Path, patient: str = "demo03", label: int = 1, index: int = 0) -> Path:
    return sorted((src / patient / str(label)).iterdir())[index]


def corrupt(src: Path) -> Path:
    path = _victim(src)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def truncated(src: Path) -> Path:
    path = _victim(src, index=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def empty_file(src: Path) -> Path:
    path = _victim(src, index=2)
    path.write_bytes(b"")
    return path


def label_mismatch(src: Path) -> Path:
    # a class-1 file that sits in the class-0 folder
    path = _victim(src, patient="demo04", label=1, index=0)
    moved = src / "demo04" / "0" / path.name
    path.rename(moved)
    return moved


def wrong_size(src: Path) -> Path:
    path = _victim(src, patient="demo05", label=0, index=0)
    with Image.open(path) as img:
        img.resize((64, 64)).save(path)
    return path


def bad_name(src: Path) -> Path:
    path = src / "demo06" / "0" / "scan_notes.png"
    shutil.copy(_victim(src, patient="demo06", label=0), path)
    return path


def patient_mismatch(src: Path) -> Path:
    path = _victim(src, patient="demo07", label=0, index=0)
    moved = src / "demo08" / "0" / path.name  # file says demo07, folder says demo08
    path.rename(moved)
    return moved


# (reason counted in the manifest, how to make it, does the good file disappear from the source)
BAD: dict[str, tuple[Callable[[Path], Path], bool]] = {
    "corrupt": (corrupt, True),
    "truncated": (truncated, True),
    "empty_file": (empty_file, True),
    "label_mismatch": (label_mismatch, True),
    "wrong_size": (wrong_size, True),
    "bad_name": (bad_name, False),
    "patient_mismatch": (patient_mismatch, True),
}


def shard_paths(out: Path) -> set[str]:
    paths = set()
    for shard in load_manifest(out)["shards"]:
        for sample in iter_shard(out / shard["name"]):
            paths.add(json.loads(sample["json"])["path"])
    return paths


def good_paths(src: Path, bad: set[str]) -> set[str]:
    return {
        str(p.relative_to(src)) for p in src.rglob("*.png") if str(p.relative_to(src)) not in bad
    }


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_input_alone(reason, demo_copy, tmp_path):
    make, replaces_good = BAD[reason]
    bad_file = make(demo_copy)
    with pytest.raises(UserError) as err:
        run_ingest(IngestConfig(src=str(demo_copy), out=str(tmp_path / "out")))
    message = str(err.value)
    assert str(bad_file) in message and reason in message and "--skip-bad" in message
    assert not (tmp_path / "out").exists(), "a refused ingest must not write anything"

    manifest = run_ingest(
        IngestConfig(src=str(demo_copy), out=str(tmp_path / "out"), skip_bad=True)
    )
    rel = str(bad_file.relative_to(demo_copy))
    assert manifest["skipped"]["counts"] == {reason: 1}
    assert manifest["skipped"]["files"][0]["path"] == rel
    expected_good = GOOD_TOTAL - (1 if replaces_good else 0)
    assert manifest["totals"]["images"] == expected_good
    assert shard_paths(tmp_path / "out") == good_paths(demo_copy, {rel})


def test_all_bad_inputs_mixed_with_good_files(demo_copy, tmp_path):
    bad = {reason: make(demo_copy) for reason, (make, _) in BAD.items()}
    with pytest.raises(UserError) as err:
        run_ingest(IngestConfig(src=str(demo_copy), out=str(tmp_path / "out")))
    for path in bad.values():
        assert str(path) in str(err.value)
    manifest = run_ingest(
        IngestConfig(src=str(demo_copy), out=str(tmp_path / "out"), skip_bad=True)
    )
    assert manifest["skipped"]["counts"] == dict.fromkeys(sorted(BAD), 1)
    rels = {str(p.relative_to(demo_copy)) for p in bad.values()}
    assert shard_paths(tmp_path / "out") == good_paths(demo_copy, rels)


def _shrink(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as img:
        img.crop((0, 0, *size)).save(path)


def test_small_patches_need_a_policy(demo_copy, tmp_path):
    small = _victim(demo_copy, patient="demo02", label=0)
    _shrink(small, (50, 27))
    with pytest.raises(UserError) as err:
        run_ingest(IngestConfig(src=str(demo_copy), out=str(tmp_path / "e")))
    assert str(small) in str(err.value) and "--small-patches pad" in str(err.value)

    dropped = run_ingest(
        IngestConfig(src=str(demo_copy), out=str(tmp_path / "d"), small_patches="drop")
    )
    assert dropped["totals"]["images"] == GOOD_TOTAL - 1
    assert dropped["dropped"]["small"] == 1

    padded = run_ingest(
        IngestConfig(src=str(demo_copy), out=str(tmp_path / "p"), small_patches="pad")
    )
    assert padded["totals"]["images"] == GOOD_TOTAL
    assert padded["small_patches"]["files"] == [str(small.relative_to(demo_copy))]
    found = None
    for shard in load_manifest(tmp_path / "p")["shards"]:
        for sample in iter_shard(tmp_path / "p" / shard["name"]):
            meta = json.loads(sample["json"])
            if meta["path"] == str(small.relative_to(demo_copy)):
                found = (meta, sample["png"])
    meta, png = found
    assert meta["padded_from"] == [50, 27]
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (50, 50)
        assert img.getpixel((25, 40)) == (255, 255, 255)  # the pad is white slide background


def test_empty_folder(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(UserError, match="no images found"):
        run_ingest(IngestConfig(src=str(tmp_path / "src"), out=str(tmp_path / "out")))


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_ingest(IngestConfig(src=str(tmp_path / "nope"), out=str(tmp_path / "out")))


def test_missing_class(demo_copy, tmp_path):
    for folder in demo_copy.glob("*/1"):
        shutil.rmtree(folder)
    with pytest.raises(UserError, match="class '1' has no usable images"):
        run_ingest(IngestConfig(src=str(demo_copy), out=str(tmp_path / "out")))


def test_too_few_patients_for_the_pools(demo_copy, tmp_path):
    for patient in sorted(p for p in demo_copy.iterdir() if p.is_dir())[2:]:
        shutil.rmtree(patient)
    with pytest.raises(UserError, match="pool"):
        run_ingest(IngestConfig(src=str(demo_copy), out=str(tmp_path / "out")))


def test_non_image_files_are_ignored_and_listed(demo_copy, tmp_path):
    (demo_copy / ".DS_Store").write_bytes(b"\0\0")
    (demo_copy / "demo01" / "README.txt").write_text("notes")
    manifest = run_ingest(IngestConfig(src=str(demo_copy), out=str(tmp_path / "out")))
    assert {".DS_Store", "demo01/README.txt"} <= set(manifest["ignored_files"])
    assert manifest["totals"]["images"] == GOOD_TOTAL
