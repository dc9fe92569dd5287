"""Generation: shards reproducible bit for bit whoever makes them, skip/redo, shared manifest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import GenerateConfig
from synthbreast.data.shards import SCHEMA, iter_shard, load_manifest, pool_shards, verify_shards
from synthbreast.errors import UserError
from synthbreast.fileio import sha256_file
from synthbreast.generate import run_generate, shard_latents, shard_seed, shards_for_process
from synthbreast.models.msggan import Generator, MSGGANConfig
from synthbreast.train.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
# Variables that would change which shards a process takes.
SPLIT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


def make_run(
    run_dir: Path, class_label: int | None = 1, resolution: int = 16, shards: Path | None = None
) -> Path:
    """A training run folder with one checkpoint of a tiny random generator."""
    torch.manual_seed(0)
    model = MSGGANConfig(resolution=resolution, latent_dim=32, width=0.0625)
    G = Generator(model)
    state = {
        "config": {
            "class_label": class_label,
            "resolution": resolution,
            "latent_dim": 32,
            "shards": str(shards) if shards else None,
        },
        "model": model.to_dict(),
        "G": G.state_dict(),
        "G_ema": {k: v.clone() for k, v in G.state_dict().items()},
        "kimg": 1.5,
        "step": 7,
    }
    save_checkpoint(run_dir, 7, state)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("gan") / "00000-tiny")


@pytest.fixture(autouse=True)
def no_split_env(monkeypatch):
    for name in SPLIT_VARS:
        monkeypatch.delenv(name, raising=False)


def config(run_dir: Path, out: Path, **overrides) -> GenerateConfig:
    defaults = {"shards": 6, "per_shard": 8, "batch_size": 3}  # 3 + 3 + 2: a short last batch
    return GenerateConfig(checkpoint=str(run_dir), out=str(out), **{**defaults, **overrides})


def cli_command(run_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--checkpoint",
        str(run_dir),
        "--out",
        str(out),
        "--shards",
        "6",
        "--per-shard",
        "8",
        "--batch-size",
        "3",
        *extra,
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SPLIT_VARS}


def test_seeds_depend_on_base_seed_class_and_shard_alone():
    assert shard_seed(0, 3, 1) == shard_seed(0, 3, 1) != shard_seed(0, 4, 1) != shard_seed(1, 3, 1)
    assert shard_seed(0, 3, 0) != shard_seed(0, 3, 1)
    assert torch.equal(shard_latents(0, 3, 1, 5, 8), shard_latents(0, 3, 1, 5, 8))
    assert not torch.equal(shard_latents(0, 3, 1, 5, 8), shard_latents(0, 2, 1, 5, 8))


def test_work_split_by_range_slurm_array_and_rank():
    job = GenerateConfig(checkpoint="x", out="y", shards=76)
    blocks = []
    for task in range(8):
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "8"}
        blocks.append(shards_for_process(job, env))
    assert [i for b in blocks for i in b] == list(range(76)), "each shard in one block"
    assert all(b == list(range(b[0], b[-1] + 1)) for b in blocks), "blocks are contiguous"
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8", "RANK": "1"}
    assert shards_for_process(job, {**env, "WORLD_SIZE": "2"}) == blocks[1][1::2]
    job.shard_range = "2:7"
    assert shards_for_process(job, {"RANK": "0", "WORLD_SIZE": "2"}) == [2, 4, 6]
    for bad in ("5:2", "3", "a:b", "70:80"):
        job.shard_range = bad
        with pytest.raises(UserError, match="--shard-range"):
            shards_for_process(job, {})


@pytest.mark.distributed
def test_a_shard_made_alone_equals_it_made_by_two_ranks(run_dir, tmp_path):
    alone, together = tmp_path / "alone", tmp_path / "together"
    summary = run_generate(config(run_dir, alone, shard_range="3:4"))
    assert (summary["made"], summary["skipped"], summary["images"]) == (1, 0, 8)

    # torchrun sets OMP_NUM_THREADS=1; this process runs with torch's default (2 here)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "synthbreast", *cli_command(run_dir, together)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=REPO, env=clean_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2" in done.stderr and "rank 1/2" in done.stderr, done.stderr[-3000:]

    manifest = load_manifest(together)
    assert verify_shards(together, manifest) == []
    ranks = {s["name"]: s["made_by"]["rank"] for s in manifest["shards"]}
    assert ranks == {f"synthetic-{i:06d}.tar": i % 2 for i in range(6)}, "both ranks took part"
    name = "synthetic-000003.tar"
    assert sha256_file(alone / name) == sha256_file(together / name)
    assert load_manifest(alone)["status"] == "incomplete"  # 1 of 6 shards


def test_rerun_skips_complete_shards_and_redoes_damaged_ones(run_dir, tmp_path):
    out = tmp_path / "out"
    first = run_generate(config(run_dir, out, shards=4, per_shard=5))
    assert (first["made"], first["skipped"]) == (4, 0)
    manifest = load_manifest(out)
    assert manifest["status"] == "complete" and verify_shards(out, manifest) == []
    shards = sorted(out.glob("*.tar"))
    original = {p.name: sha256_file(p) for p in shards}
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}

    again = run_generate(config(run_dir, out, shards=4, per_shard=5))
    assert (again["made"], again["skipped"], again["images"]) == (0, 4, 0)
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes, "complete shards untouched"

    truncated, deleted = shards[1], shards[2]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    deleted.unlink()
    assert len(verify_shards(out, load_manifest(out))) == 2
    repair = run_generate(config(run_dir, out, shards=4, per_shard=5))
    assert (repair["made"], repair["skipped"]) == (2, 2)
    assert verify_shards(out, load_manifest(out)) == []
    assert {p.name: sha256_file(p) for p in shards} == original, "redone bit for bit"


def test_concurrent_writers_leave_a_complete_consistent_manifest(run_dir, tmp_path):
    out = tmp_path / "out"
    # overlapping ranges: shards 2 and 3 are made by both, with the same bytes
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "synthbreast", *cli_command(run_dir, out, "--shard-range", r)],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ("0:4", "2:6")
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    manifest = load_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == [f"synthetic-{i:06d}.tar" for i in range(6)]
    assert manifest["status"] == "complete"
    assert verify_shards(out, manifest) == []
    assert len(pool_shards(out, manifest, "synthetic")) == 6
    assert not list(out.glob(".*.tmp-*")), "no temp files left behind"


def test_another_job_in_the_same_out_is_refused(run_dir, tmp_path):
    out = tmp_path / "out"
    run_generate(config(run_dir, out, shard_range="0:1"))
    with pytest.raises(UserError, match=r"seed 0 there, 1 now.*new --out"):
        run_generate(config(run_dir, out, shard_range="1:2", seed=1))
    with pytest.raises(UserError, match=r"output_size 16 there, 20 now.*new --out"):
        run_generate(config(run_dir, out, shard_range="1:2", output_size=20))
    # a class the per-class model never saw would mislabel every image: refused before that
    with pytest.raises(UserError, match="trained on class 1 alone"):
        run_generate(config(run_dir, out, shard_range="1:2", class_label=0))
    with pytest.raises(UserError, match="per_shard"):
        run_generate(config(run_dir, out, shard_range="1:2", per_shard=9))
    assert len(load_manifest(out)["shards"]) == 1


def test_missing_corrupt_and_classless_checkpoints_are_clear_errors(run_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        run_generate(config(tmp_path / "nowhere.json", tmp_path / "a"))
    with pytest.raises(UserError, match="no checkpoints"):
        run_generate(config(tmp_path, tmp_path / "b"))
    corrupt = make_run(tmp_path / "corrupt")
    tensors = next((corrupt / "checkpoints").glob("*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-10] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        run_generate(config(corrupt, tmp_path / "c"))
    classless = make_run(tmp_path / "all-classes", class_label=None)
    with pytest.raises(UserError, match="--class"):
        run_generate(config(classless, tmp_path / "d"))
    summary = run_generate(config(classless, tmp_path / "d", class_label=0, shard_range="0:1"))
    assert summary["made"] == 1


def test_output_size_schema_and_inspect(tmp_path):
    # the GAN's training shards were demo data: the synthetic manifest says so
    train_shards = tmp_path / "train-shards"
    train_shards.mkdir()
    source = {"demo": True, "class_names": ["0", "1"]}
    (train_shards / "manifest.json").write_text(json.dumps({"schema": SCHEMA, "source": source}))
    run_dir = make_run(tmp_path / "run", shards=train_shards)
    out = tmp_path / "out"
    summary = run_generate(config(run_dir, out, shards=2, per_shard=4, output_size=50))
    assert summary["images"] == 8 and summary["images_per_s"] > 0
    samples = list(iter_shard(out / "synthetic-000001.tar"))
    assert [s["__key__"] for s in samples] == [f"syn-c1-000001-{j:06d}" for j in range(4)]
    for j, sample in enumerate(samples):
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.size, image.mode) == ((50, 50), "RGB")
        assert sample["cls"] == b"1"
        meta = json.loads(sample["json"])
        assert meta["synthetic"] is True and meta["patient"] == "synthetic"
        assert (meta["shard"], meta["index"], meta["label"], meta["base_seed"]) == (1, j, 1, 0)
        assert meta["seed"] == shard_seed(0, 1, 1)
        assert len(meta["checkpoint"]) == 64
    manifest = load_manifest(out)
    assert manifest["source"]["synthetic"] is True and manifest["source"]["real"] is False
    assert manifest["source"]["demo"] is True
    assert manifest["source"]["checkpoint"] == meta["checkpoint"]
    assert manifest["sample"]["image_size"] == 50
    assert json.loads((out / "config.json").read_text())["job"] == "GenerateConfig"

    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "synthetic" in result.output
    assert "DEMO DATA" in result.output


def test_cli_help_and_a_backwards_range(run_dir, tmp_path):
    result = runner.invoke(app, ["generate", "--help"])
    assert result.exit_code == 0 and "--shard-range" in result.output
    result = runner.invoke(app, cli_command(run_dir, tmp_path / "o", "--shard-range", "5:2"))
    assert result.exit_code == 2
    assert "START < END" in result.output
    assert not (tmp_path / "o").exists(), "refused before writing anything"
