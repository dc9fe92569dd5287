"""Ingest on demo data: patient-level pools, manifest counts, checksums, determinism, options."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from synthbreast.config import IngestConfig
from synthbreast.data.ingest import run_ingest, shard_sizes, split_patients
from synthbreast.data.layouts import Record
from synthbreast.data.shards import iter_shard, load_manifest, verify_shards
from synthbreast.errors import UserError

from .conftest import DEMO_PATIENTS, DEMO_PER_CLASS


def read_all(root: Path) -> list[tuple[str, dict, bytes, int]]:
    """(pool, meta, image bytes, label) of every sample in every shard of the manifest."""
    manifest = load_manifest(root)
    rows = []
    for shard in manifest["shards"]:
        for sample in iter_shard(root / shard["name"]):
            rows.append(
                (shard["pool"], json.loads(sample["json"]), sample["png"], int(sample["cls"]))
            )
    return rows


def ingest(src: Path, out: Path, **options) -> dict:
    return run_ingest(IngestConfig(src=str(src), out=str(out), **options))


def test_no_patient_in_two_pools(demo_shards):
    manifest = load_manifest(demo_shards)
    pools = {name: set(info["patients"]) for name, info in manifest["pools"].items()}
    assert set(pools) == {"gan", "train", "test"}
    names = list(pools)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not pools[a] & pools[b], f"patients in both {a} and {b}"
    assert set().union(*pools.values()) == {f"demo{i:02d}" for i in range(DEMO_PATIENTS)}
    # and what the shards actually hold agrees with the manifest's patient lists
    for pool, meta, _, _ in read_all(demo_shards):
        assert meta["patient"] in pools[pool]
        assert meta["pool"] == pool


def test_manifest_counts_match_shards(demo_shards):
    manifest = load_manifest(demo_shards)
    rows = read_all(demo_shards)
    read = Counter((pool, str(label)) for pool, _, _, label in rows)
    for pool, info in manifest["pools"].items():
        for label, count in info["counts"].items():
            assert read[(pool, label)] == count
    assert sum(read.values()) == manifest["totals"]["images"] == DEMO_PATIENTS * DEMO_PER_CLASS * 2
    for shard in manifest["shards"]:
        assert sum(1 for _ in iter_shard(demo_shards / shard["name"])) == shard["count"]
    assert manifest["status"] == "complete"
    assert manifest["source"]["demo"] is True and manifest["source"]["real"] is False


def test_checksums_verify_and_damage_is_found(demo_shards, tmp_path):
    assert verify_shards(demo_shards, load_manifest(demo_shards)) == []
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in demo_shards.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    victim = copy / load_manifest(copy)["shards"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify_shards(copy, load_manifest(copy))
    assert len(problems) == 1 and victim.name in problems[0]


def test_samples_keep_source_bytes_and_metadata(demo_shards, demo_dir):
    for _, meta, png, label in read_all(demo_shards)[:50]:
        assert png == (demo_dir / meta["path"]).read_bytes()
        assert meta["label"] == label
        assert meta["path"].startswith(f"{meta['patient']}/{label}/")
        assert isinstance(meta["x"], int) and isinstance(meta["y"], int)


def test_split_follows_fractions_by_class(demo_shards):
    manifest = load_manifest(demo_shards)
    total = manifest["totals"]["images"] / 2  # per class
    targets = {"gan": 0.5, "train": 0.35, "test": 0.15}
    for pool, info in manifest["pools"].items():
        for label in ("0", "1"):
            # whole patients of 20 patches each: within one patient's share (1/12) of target
            assert abs(info["counts"][label] / total - targets[pool]) <= 1 / DEMO_PATIENTS


def test_split_patients_is_deterministic_and_seeded():
    records = [
        Record(f"p{p}/{c}/{i}.png", f"p{p}", c)
        for p in range(30)
        for c in (0, 1)
        for i in range(p % 7 + 1)
    ]
    fractions = {"gan": 0.5, "train": 0.35, "test": 0.15}
    a = split_patients(records, fractions, seed=1)
    assert a == split_patients(records, fractions, seed=1)
    assert a != split_patients(records, fractions, seed=2)


def test_same_seed_same_shards_different_seed_different_split(demo_dir, tmp_path):
    a = ingest(demo_dir, tmp_path / "a", shard_size=100)
    b = ingest(demo_dir, tmp_path / "b", shard_size=100)
    c = ingest(demo_dir, tmp_path / "c", shard_size=100, seed=7)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["pools"]["test"]["patients"] != c["pools"]["test"]["patients"]


def test_shard_sizes_respect_max_and_min():
    assert shard_sizes(10, 4, 1) == [4, 3, 3]
    assert shard_sizes(10, 100, 8) == [2, 2, 1, 1, 1, 1, 1, 1]
    assert shard_sizes(3, 100, 8) == [1, 1, 1]
    assert shard_sizes(0, 5, 8) == []


def test_undersample_balances_every_pool(demo_copy, tmp_path):
    # unbalance the source first: drop most class-1 patches of half the patients
    for patient in sorted(p for p in demo_copy.iterdir() if p.is_dir())[:6]:
        for png in sorted((patient / "1").iterdir())[5:]:
            png.unlink()
    plain = ingest(demo_copy, tmp_path / "plain")
    assert any(i["counts"]["0"] != i["counts"]["1"] for i in plain["pools"].values())
    manifest = ingest(demo_copy, tmp_path / "b", balance="undersample")
    for info in manifest["pools"].values():
        assert info["counts"]["0"] == info["counts"]["1"] > 0
    assert manifest["dropped"]["balance"] > 0


def test_max_per_class_caps_each_class(demo_dir, tmp_path):
    manifest = ingest(demo_dir, tmp_path / "m", max_per_class=100, gan_fraction=0.0)
    totals = Counter()
    for info in manifest["pools"].values():
        totals.update(info["counts"])
    assert totals == {"0": 100, "1": 100}
    assert manifest["dropped"]["max_per_class"] == DEMO_PATIENTS * DEMO_PER_CLASS * 2 - 200
    assert set(manifest["pools"]) == {"train", "test"}


def test_refuses_non_empty_out_without_overwrite(demo_dir, tmp_path):
    out = tmp_path / "o"
    ingest(demo_dir, out)
    with pytest.raises(UserError, match="--overwrite"):
        ingest(demo_dir, out)
    again = ingest(demo_dir, out, overwrite=True, seed=3)
    assert again["config"]["seed"] == 3
    assert verify_shards(out, load_manifest(out)) == []


def test_overwrite_never_deletes_files_it_did_not_write(demo_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    with pytest.raises(UserError, match=r"thesis\.docx"):
        ingest(demo_dir, out, overwrite=True)
    assert (out / "thesis.docx").read_text() == "precious"


def test_resume_rewrites_only_missing_or_damaged_shards(demo_dir, tmp_path):
    out = tmp_path / "r"
    first = ingest(demo_dir, out, shard_size=50)
    names = [s["name"] for s in first["shards"]]
    (out / names[0]).unlink()
    (out / names[1]).write_bytes(b"damaged")
    resumed = ingest(demo_dir, out, shard_size=50, resume=True)
    assert resumed["resumed_shards"] == len(names) - 2
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in first["shards"]]
    with pytest.raises(UserError, match="different config"):
        ingest(demo_dir, out, shard_size=60, resume=True)


def test_config_json_is_written_beside_the_shards(demo_shards):
    config = json.loads((demo_shards / "config.json").read_text())
    assert config["job"] == "IngestConfig"
    assert config["format"] == "idc" and config["patch_size"] == 50


def test_channels_follow_the_data_or_the_option(demo_dir, demo_shards, tmp_path):
    """RGB IDC stays 3-channel; --channels 1 stores grey PNGs that the reader gives as [1, H, W];
    old folders without the field read as 3 channels."""
    import io

    from PIL import Image

    from synthbreast.data.reader import shard_dataset

    assert load_manifest(demo_shards)["sample"]["channels"] == 3
    assert next(iter(shard_dataset(demo_shards, "gan")))["image"].shape[0] == 3
    manifest = ingest(demo_dir, tmp_path / "grey", channels=1, min_shards=1)
    assert manifest["sample"]["channels"] == 1
    _, meta, png, _ = read_all(tmp_path / "grey")[0]
    assert Image.open(io.BytesIO(png)).mode == "L" and meta["converted_from"] == "RGB"
    assert tuple(next(iter(shard_dataset(tmp_path / "grey", "gan")))["image"].shape) == (1, 50, 50)
    assert json.loads((tmp_path / "grey" / "config.json").read_text())["channels"] == 1
