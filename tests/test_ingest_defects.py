"""Issue 13's ingest defects, each on real files: symlinked patient folders, the Kaggle wrapper
folder, 16-bit PNGs, --resume with paths spelled differently, inspect's advice per job."""

from __future__ import annotations

import io
import json
import shlex
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import GenerateConfig, IngestConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.shards import decode_image, iter_shard, load_manifest, verify_shards
from synthbreast.errors import UserError
from synthbreast.generate import run_generate

from .conftest import DEMO_PATIENTS, DEMO_PER_CLASS
from .test_generate import SPLIT_VARS, make_run

GOOD_TOTAL = DEMO_PATIENTS * DEMO_PER_CLASS * 2
KAGGLE_WRAPPER = "IDC_regular_ps50_idx5"
runner = CliRunner()


def ingest(src: Path, out: Path, **options) -> dict:
    return run_ingest(IngestConfig(src=str(src), out=str(out), **options))


def patients_of(manifest: dict) -> set[str]:
    return set().union(*(set(info["patients"]) for info in manifest["pools"].values()))


def shas(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def samples_by_path(out: Path) -> dict[str, dict]:
    found = {}
    for shard in load_manifest(out)["shards"]:
        for sample in iter_shard(out / shard["name"]):
            found[json.loads(sample["json"])["path"]] = sample
    return found


def refusal(**run) -> str:
    """The message of a refused ingest; it must be one line."""
    with pytest.raises(UserError) as err:
        ingest(**run)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- 1. symlinked patient folders and image files ------------------------------------------


def _move_and_link(src: Path, elsewhere: Path, names: list[str]) -> None:
    """Move patient folders out of src and link them back, as subsets are built on clusters."""
    elsewhere.mkdir(exist_ok=True)
    for name in names:
        shutil.move(src / name, elsewhere / name)
        (src / name).symlink_to(elsewhere / name, target_is_directory=True)


def _patient_names(src: Path) -> list[str]:
    return sorted(p.name for p in src.iterdir() if p.is_dir())


def test_symlinked_patient_folders_are_followed_and_recorded(demo_copy, tmp_path):
    names = _patient_names(demo_copy)
    _move_and_link(demo_copy, tmp_path / "elsewhere", names[-3:])
    manifest = ingest(demo_copy, tmp_path / "out")
    assert patients_of(manifest) == set(names)
    assert manifest["totals"]["images"] == GOOD_TOTAL
    links = manifest["source"]["links"]
    assert links["followed_dirs"] == [
        {"path": name, "target": str((tmp_path / "elsewhere" / name).resolve())}
        for name in names[-3:]
    ]
    assert links["followed_files"] == 0 and links["duplicates"] == []


def test_all_patients_symlinked_give_the_same_shards(demo_dir, demo_copy, tmp_path):
    _move_and_link(demo_copy, tmp_path / "elsewhere", _patient_names(demo_copy))
    plain = ingest(demo_dir, tmp_path / "plain")
    linked = ingest(demo_copy, tmp_path / "linked")
    assert shas(linked) == shas(plain)


def test_symlinked_image_files_are_followed(demo_copy, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    folder = demo_copy / "demo02" / "1"
    for path in sorted(folder.iterdir()):
        shutil.move(path, store / path.name)
        path.symlink_to(store / path.name)
    manifest = ingest(demo_copy, tmp_path / "out")
    assert manifest["totals"]["images"] == GOOD_TOTAL
    assert manifest["source"]["links"]["followed_files"] == DEMO_PER_CLASS
    found = samples_by_path(tmp_path / "out")
    name = sorted(store.iterdir())[0].name
    assert found[f"demo02/1/{name}"]["png"] == (store / name).read_bytes()


def test_a_folder_reached_twice_is_taken_once(demo_copy, tmp_path):
    # a second link to a patient: the same files, once (under the real path), not two patients
    (demo_copy / "zz-again").symlink_to(demo_copy / "demo00", target_is_directory=True)
    manifest = ingest(demo_copy, tmp_path / "out")
    assert manifest["totals"]["images"] == GOOD_TOTAL and not manifest["skipped"]["counts"]
    assert "zz-again" not in patients_of(manifest)
    duplicates = manifest["source"]["links"]["duplicates"]
    assert len(duplicates) == 2 * DEMO_PER_CLASS
    assert all(d["path"].startswith("zz-again/") for d in duplicates)
    assert all(d["same_file_as"] == "demo00" + d["path"][len("zz-again") :] for d in duplicates)


def _dangling(src: Path, tmp_path: Path) -> Path:
    link = src / "demo99"
    link.symlink_to(tmp_path / "unmounted" / "demo99", target_is_directory=True)
    return link


def _loop_to_parent(src: Path, tmp_path: Path) -> Path:
    link = src / "demo00" / "0" / "again"
    link.symlink_to(src / "demo00", target_is_directory=True)
    return link


def _link_to_itself(src: Path, tmp_path: Path) -> Path:
    link = src / "demo97"
    link.symlink_to(link)
    return link


@pytest.mark.parametrize(
    ("reason", "make"),
    [
        ("dangling_link", _dangling),
        ("symlink_loop", _loop_to_parent),
        ("symlink_loop", _link_to_itself),
    ],
)
def test_a_broken_link_is_one_line_naming_it_or_a_counted_skip(reason, make, demo_copy, tmp_path):
    link = make(demo_copy, tmp_path)
    message = refusal(src=demo_copy, out=tmp_path / "out")
    assert str(link) in message and reason in message and "--skip-bad" in message
    assert not (tmp_path / "out").exists()
    manifest = ingest(demo_copy, tmp_path / "out", skip_bad=True)
    assert manifest["totals"]["images"] == GOOD_TOTAL
    assert sum(manifest["skipped"]["counts"].values()) == manifest["skipped"]["counts"][reason]
    assert str(link.relative_to(demo_copy)) in {f["path"] for f in manifest["skipped"]["files"]}


# --- 2. the Kaggle download's own wrapper folder ---------------------------------------------


def test_the_kaggle_wrapper_folder_is_descended_with_a_log_line(demo_dir, tmp_path):
    download = tmp_path / "download"
    shutil.copytree(demo_dir, download / KAGGLE_WRAPPER)
    (download / "README.txt").write_text("from kaggle")
    out = tmp_path / "out"
    result = runner.invoke(app, ["ingest", str(download), str(out), "--shard-size", "40"])
    assert result.exit_code == 0, result.output
    assert f"{KAGGLE_WRAPPER}" in result.output and "patient folders" in result.output
    manifest = load_manifest(out)
    assert manifest["source"]["descended_into"] == KAGGLE_WRAPPER
    assert manifest["source"]["path"] == str(download.resolve())
    assert manifest["totals"]["images"] == GOOD_TOTAL and not manifest["skipped"]["counts"]
    assert manifest["source"]["demo"] is True  # the marker beside the patient folders counts
    direct = ingest(download / KAGGLE_WRAPPER, tmp_path / "direct", shard_size=40)
    assert direct["source"]["descended_into"] is None
    assert shas(manifest) == shas(direct)


def test_two_wrapper_folders_are_a_one_line_question(demo_dir, tmp_path):
    download = tmp_path / "download"
    shutil.copytree(demo_dir, download / "a")
    shutil.copytree(demo_dir, download / "b")
    message = refusal(src=download, out=tmp_path / "out")
    assert str(download / "a") in message and str(download / "b") in message
    assert "point SRC at" in message


def test_patients_beside_a_wrapper_of_patients_is_a_one_line_question(demo_copy, tmp_path):
    # the full Kaggle archive holds the patient folders twice: at the top and in the wrapper
    shutil.copytree(demo_copy / "demo00", demo_copy / KAGGLE_WRAPPER / "demo00")
    message = refusal(src=demo_copy, out=tmp_path / "out")
    assert f"point SRC at {demo_copy / KAGGLE_WRAPPER}" in message


# --- 3. 16-bit images ------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand: PIL writes 16-bit grey but not 16-bit RGB or grey+alpha."""
    height, width = array.shape[:2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _replace(folder: Path, make) -> dict[str, np.ndarray]:
    """Rewrite every image of a folder with `make(rng)` -> (file bytes, 16-bit source array)."""
    rng = np.random.default_rng(0)
    sources = {}
    for path in sorted(folder.iterdir()):
        data, array = make(rng)
        path.write_bytes(data)
        sources[path.name] = array
    return sources


def _grey16(rng, size=(50, 50)):
    array = rng.integers(50_000, 65_536, size=size, dtype=np.uint16)  # mean ~227.9 * 257
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue(), array


def test_16_bit_grey_png_is_scaled_not_clipped(demo_copy, tmp_path):
    folder = demo_copy / "demo03" / "0"
    sources = _replace(folder, _grey16)
    with Image.open(folder / sorted(sources)[0]) as img:
        assert img.mode == "I;16"  # what PIL makes of it: the case that came out white
    out = tmp_path / "out"
    manifest = ingest(demo_copy, out)
    assert manifest["totals"]["images"] == GOOD_TOTAL
    found = samples_by_path(out)
    for name, array in sources.items():
        sample = found[f"demo03/0/{name}"]
        decoded = np.asarray(decode_image(sample["png"]), dtype=np.float64)
        assert abs(decoded.mean() - array.mean() / 257) < 1
        assert np.array_equal(decoded[..., 0], np.rint(array / 257))
        assert json.loads(sample["json"])["converted_from"] == "I;16"
    assert verify_shards(out, load_manifest(out)) == []


def test_a_small_16_bit_patch_is_padded_with_its_grey_kept(demo_copy, tmp_path):
    path = sorted((demo_copy / "demo03" / "0").iterdir())[0]
    data, array = _grey16(np.random.default_rng(1), size=(30, 50))  # 50 wide, 30 high
    path.write_bytes(data)
    ingest(demo_copy, tmp_path / "out", small_patches="pad")
    sample = samples_by_path(tmp_path / "out")[f"demo03/0/{path.name}"]
    decoded = np.asarray(decode_image(sample["png"]))
    assert decoded.shape == (50, 50, 3)
    assert np.array_equal(decoded[:30, :, 0], np.rint(array / 257))
    assert (decoded[30:] == 255).all()  # the pad is white glass


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_rgb_and_rgba_png_decode_within_one_of_the_source(channels, demo_copy, tmp_path):
    def make(rng):
        array = rng.integers(0, 65_536, size=(50, 50, channels), dtype=np.uint16)
        return png16(array), array

    folder = demo_copy / "demo03" / "1"
    sources = _replace(folder, make)
    with Image.open(folder / sorted(sources)[0]) as img:
        assert img.mode == ("RGB", "RGBA")[channels - 3]  # PIL reduces these to 8 bits itself
    ingest(demo_copy, tmp_path / "out")
    found = samples_by_path(tmp_path / "out")
    for name, array in sources.items():
        decoded = np.asarray(decode_image(found[f"demo03/1/{name}"]["png"]), dtype=np.float64)
        assert np.abs(decoded - array[..., :3] / 257).max() <= 1


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "L"])
def test_8_bit_modes_are_stored_as_they_were(mode, demo_copy, tmp_path):
    folder = demo_copy / "demo03" / "1"
    for path in sorted(folder.iterdir()):
        with Image.open(path) as img:
            img.convert(mode).save(path)
    ingest(demo_copy, tmp_path / "out")
    found = samples_by_path(tmp_path / "out")
    for path in sorted(folder.iterdir()):
        sample = found[f"demo03/1/{path.name}"]
        assert sample["png"] == path.read_bytes()
        assert "converted_from" not in json.loads(sample["json"])
        with Image.open(path) as img:
            expected = np.asarray(img.convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(sample["png"])), expected)


# --- 4. --resume with the same paths spelled differently -------------------------------------


def _interrupted(demo_dir: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    """An ingest in tmp_path/out of a copy in tmp_path/data, its first shard lost."""
    src, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(demo_dir, src)
    first = ingest(src, out, shard_size=50)
    (out / first["shards"][0]["name"]).unlink()
    return src, out, first


def test_resume_with_relative_or_linked_paths_is_the_same_job(demo_dir, tmp_path, monkeypatch):
    src, out, first = _interrupted(demo_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    resumed = run_ingest(IngestConfig(src="data", out="out", shard_size=50, resume=True))
    assert resumed["resumed_shards"] == len(first["shards"]) - 1
    assert shas(resumed) == shas(first)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    (out / first["shards"][1]["name"]).unlink()
    resumed = run_ingest(IngestConfig(src="link/", out="./out/", shard_size=50, resume=True))
    assert resumed["resumed_shards"] == len(first["shards"]) - 1
    assert shas(resumed) == shas(first)


def test_resume_after_the_source_and_out_moved(demo_dir, tmp_path):
    src, out, first = _interrupted(demo_dir, tmp_path)
    moved_src, moved_out = src.rename(tmp_path / "moved-data"), out.rename(tmp_path / "moved-out")
    resumed = ingest(moved_src, moved_out, shard_size=50, resume=True)
    assert resumed["resumed_shards"] == len(first["shards"]) - 1
    assert shas(resumed) == shas(first)
    assert verify_shards(moved_out, load_manifest(moved_out)) == []


def test_resume_refusal_names_the_field_and_keeps_good_work(demo_dir, tmp_path):
    src, out, first = _interrupted(demo_dir, tmp_path)
    message = refusal(src=src, out=out, shard_size=60, resume=True)
    assert "different config" in message
    assert "--shard-size 50 there, 60 here" in message
    assert "rerun with --shard-size 50" in message and "another OUT" in message
    assert "--overwrite deletes" in message
    message = refusal(src=src, out=out, shard_size=50, seed=4, skip_bad=True, resume=True)
    assert "--seed 0 there, 4 here" in message and "--skip-bad" in message
    assert len(list(out.glob("*.tar"))) == len(first["shards"]) - 1, "nothing was deleted"


def test_resume_refuses_a_source_whose_files_changed(demo_dir, tmp_path):
    src, out, _ = _interrupted(demo_dir, tmp_path)
    sorted((src / "demo05" / "1").iterdir())[0].unlink()
    message = refusal(src=src, out=out, shard_size=50, resume=True)
    assert "SRC" in message and "files differ" in message and str(src.resolve()) in message
    assert f"{GOOD_TOTAL} files there, {GOOD_TOTAL - 1} here" in message


# --- 5. inspect names the command that finishes the folder -----------------------------------


def test_inspect_of_an_incomplete_generate_names_generate(tmp_path, monkeypatch):
    for name in SPLIT_VARS:
        monkeypatch.delenv(name, raising=False)
    run = make_run(tmp_path / "00000-tiny")
    out = tmp_path / "syn"
    made = GenerateConfig(
        checkpoint=str(run), out=str(out), shards=3, per_shard=4, batch_size=2, shard_range="0:1"
    )
    run_generate(made)
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 2, result.output
    assert "ingest" not in result.output
    command = result.output.split("`")[1]
    assert command.startswith("synthbreast generate ") and "--shards 3" in command
    assert "--shard-range" not in command  # the rest of the job, not the part already made
    finished = runner.invoke(app, shlex.split(command)[1:])
    assert finished.exit_code == 0, finished.output
    assert "2 shards made, 1 already complete" in finished.output
    again = runner.invoke(app, ["inspect", str(out)])
    assert again.exit_code == 0, again.output


def test_inspect_of_an_incomplete_ingest_names_the_ingest_resume(demo_dir, tmp_path):
    src, out, _ = _interrupted(demo_dir, tmp_path)
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 2, result.output
    command = result.output.split("`")[1]
    assert command == f"synthbreast ingest {src.resolve()} {out} --shard-size 50 --resume"
    finished = runner.invoke(app, shlex.split(command)[1:])
    assert finished.exit_code == 0, finished.output
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 0
