"""Issue 13's train-gan and generate defects, each reproduced on real files and real runs.

Damaged inputs are made as they happen: a manifest left `incomplete` by a killed ingest, a
flipped byte in a shard, a corrupt PNG inside a shard, a shard deleted while it is read, a
generate killed with SIGKILL, a full disk (a small tmpfs) and a read-only folder (a read-only
tmpfs: the tests run as root, which chmod does not stop; without mount rights they skip).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import GenerateConfig, IngestConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.reader import ShardDataset, ShardReadError, shard_dataset
from synthbreast.data.shards import (
    Sample,
    iter_shard,
    load_manifest,
    save_manifest,
    verify_shards,
    write_shard,
)
from synthbreast.errors import UserError
from synthbreast.fileio import sha256_file
from synthbreast.generate import WRITERS, run_generate, shard_name, shards_for_process
from synthbreast.models.msggan import Generator, MSGGANConfig
from synthbreast.train.checkpoint import (
    CHECKPOINT_DIR,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from synthbreast.train.gan import load_scaler_state, scaler_state
from tests.test_generate import make_run
from tests.test_train_gan import cli_args

REPO = Path(__file__).resolve().parents[1]
SPLIT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SPLIT_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def synthbreast(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
    """The real CLI in its own process; stdout and stderr together."""
    done = subprocess.run(
        [sys.executable, "-m", "synthbreast", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env or clean_env(),
        timeout=timeout,
    )
    done.output = done.stdout + done.stderr
    return done


def one_line_error(done) -> str:
    """The run failed with exit 2 and a single `error:` line, no traceback."""
    assert done.returncode == 2, done.output[-3000:]
    assert "Traceback" not in done.output, done.output[-3000:]
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.output[-3000:]
    return errors[0]


@pytest.fixture
def shards(demo_shards, tmp_path) -> Path:
    """A private copy of the demo shards that a test may damage."""
    copy = tmp_path / "shards"
    shutil.copytree(demo_shards, copy)
    return copy


def gan_entries(root: Path) -> list[dict]:
    return [s for s in load_manifest(root)["shards"] if s["pool"] == "gan"]


def rewrite_shard(root: Path, name: str, change) -> None:
    """Write shard `name` again with `change(sample) -> Sample`, listed with its new sha256:
    a shard whose bytes match the manifest but whose samples are bad."""
    path = root / name
    samples = []
    for raw in iter_shard(path):
        sample = Sample(raw["__key__"], raw["png"], int(raw["cls"]), json.loads(raw["json"]))
        samples.append(change(sample))
    entry = write_shard(path, samples)
    manifest = load_manifest(root)
    for listed in manifest["shards"]:
        if listed["name"] == name:
            listed.update(sha256=entry["sha256"], bytes=entry["bytes"])
    save_manifest(root, manifest)


def truncated_png(sample: Sample) -> Sample:
    return Sample(sample.key, sample.image[:60], sample.label, sample.meta)


# --- 1. train-gan reads only complete, intact shards; a bad one is named -----------------


def test_train_gan_refuses_an_incomplete_ingest(shards, tmp_path):
    # what a killed ingest leaves: 4 of the 6 GAN shards listed, no train/test shard
    manifest = load_manifest(shards)
    gan = [s for s in manifest["shards"] if s["pool"] == "gan"]
    manifest["shards"], manifest["status"] = gan[:4], "incomplete"
    save_manifest(shards, manifest)
    done = synthbreast(*cli_args(shards, tmp_path / "runs"))
    line = one_line_error(done)
    assert "is not complete (status 'incomplete': 4 of 6 shards of pool 'gan' written)" in line
    assert f"synthbreast inspect {shards}" in line and "--resume" in line
    assert not (tmp_path / "runs").exists(), "refused before any folder was made"


def test_train_gan_refuses_a_shard_whose_sha256_changed(shards, tmp_path):
    # flip one class byte, 0 -> 1: same size, another class, another sha256
    name = gan_entries(shards)[0]["name"]
    path = shards / name
    with tarfile.open(path) as tar:
        member = next(
            m
            for m in tar.getmembers()
            if m.name.endswith(".cls") and tar.extractfile(m).read() == b"0"
        )
    data = bytearray(path.read_bytes())
    data[member.offset_data] = ord("1")
    path.write_bytes(bytes(data))
    done = synthbreast(*cli_args(shards, tmp_path / "runs"))
    line = one_line_error(done)
    assert f"{path}: sha256 differs from the manifest" in line
    assert f"synthbreast inspect {shards}" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["reader-worker", "snapshot-metric"])
def test_a_corrupt_png_is_one_line_naming_shard_and_sample(shards, tmp_path, where):
    # every image of every GAN shard truncated, the manifest updated: the checksums pass, the
    # images do not decode, whichever the run reads first (its DataLoader worker, or the
    # snapshot metric's real reference)
    for entry in gan_entries(shards):
        rewrite_shard(shards, entry["name"], truncated_png)
    extra = ["--workers", "1", "--metric-images", "0"] if where == "reader-worker" else []
    line = one_line_error(synthbreast(*cli_args(shards, tmp_path / "runs"), *extra))
    assert "cannot be read" in line and "the shard is damaged" in line
    assert "BytesIO" not in line  # PIL's name for the buffer says nothing to the user
    assert f"synthbreast inspect {shards}" in line
    names = [e["name"] for e in gan_entries(shards)]
    assert any(f"shard {shards / n}, sample '" in line for n in names), line


def test_reader_names_a_shard_deleted_while_reading(shards):
    dataset = shard_dataset(shards, "gan")  # verified: every shard is there
    gone = shards / gan_entries(shards)[2]["name"]
    gone.unlink()
    with pytest.raises(ShardReadError, match=rf"shard {gone} is gone .*synthbreast inspect"):
        list(dataset)
    # through a DataLoader worker the error comes back with the worker's traceback in its
    # message: still one line
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    with pytest.raises(ShardReadError) as caught:
        list(loader)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"shard {gone} is gone")


def test_reader_names_the_sample_of_a_corrupt_png(shards):
    name = gan_entries(shards)[1]["name"]
    rewrite_shard(shards, name, truncated_png)
    first = next(iter_shard(shards / name))["__key__"]
    dataset = ShardDataset([shards / name])
    with pytest.raises(ShardReadError, match=rf"shard {shards / name}, sample '{first}'"):
        list(dataset)
    # a handler that says go on skips the bad samples, as webdataset's handlers do
    assert list(ShardDataset([shards / name], handler=lambda err: True)) == []


# --- 2. a resume continues only the same job ------------------------------------------------


def test_resume_with_another_class_or_other_shards_is_refused(shards, demo_dir, tmp_path):
    runs = tmp_path / "runs"
    done = synthbreast(*cli_args(shards, runs, "--class", "1", "--kimg", "0.016"))
    assert done.returncode == 0, done.output[-3000:]
    (run,) = runs.iterdir()
    config_before = (run / "config.json").read_bytes()

    line = one_line_error(
        synthbreast(*cli_args(shards, runs, "--class", "0", "--kimg", "0.032", "--resume", run))
    )
    assert "--class 1 (config field class_label), this run asks for 0" in line
    assert "resume with --class 1" in line
    line = one_line_error(
        synthbreast(*cli_args(shards, runs, "--class", "1", "--batch-size", "16", "--resume", run))
    )
    assert "(config field batch_size)" in line

    # another ingest (other patients in the GAN pool) under the run: refused, naming shards
    other = tmp_path / "other-shards"
    run_ingest(IngestConfig(src=str(demo_dir), out=str(other), shard_size=40, min_shards=4, seed=1))
    line = one_line_error(
        synthbreast(*cli_args(other, runs, "--class", "1", "--kimg", "0.032", "--resume", run))
    )
    assert "(config field shards)" in line and "whose pool holds other shards" in line
    assert (run / "config.json").read_bytes() == config_before, "the run's config rewritten"
    assert load_checkpoint(run)["step"] == 2

    # the same shards moved elsewhere: the same images, so the run continues
    moved = tmp_path / "moved"
    shards.rename(moved)
    done = synthbreast(*cli_args(moved, runs, "--class", "1", "--kimg", "0.032", "--resume", run))
    assert done.returncode == 0, done.output[-3000:]
    assert load_checkpoint(run)["step"] == 4


# --- 3. every numeric option checked before any folder --------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--kimg", "0", "--kimg 0.0: must be a number > 0"),
        ("--batch-size", "0", "--batch-size 0: must be a whole number >= 1"),
        ("--workers", "-1", "--workers -1: must be a whole number >= 0"),
        ("--resolution", "48", "--resolution 48: must be a power of two >= 8"),
        ("--resolution", "4", "--resolution 4: must be a power of two >= 8"),
        ("--latent-dim", "0", "--latent-dim 0: must be a whole number >= 1"),
        ("--lr", "-1", "--lr -1.0: must be a number > 0"),
        ("--lr", "nan", "--lr nan: must be a number > 0"),
        ("--width", "0", "--width 0.0: must be a number > 0"),
        ("--tick-kimg", "0", "--tick-kimg 0.0: must be a number > 0"),
        ("--gp-interval", "0", "--gp-interval 0: must be a whole number >= 1"),
        ("--r1-gamma", "-1", "--r1-gamma -1.0: must be a number >= 0"),
        ("--metric-images", "1", "--metric-images 1: must be 0"),
    ],
)
def test_bad_numbers_are_one_line_before_any_folder(demo_shards, tmp_path, option, value, message):
    result = CliRunner().invoke(app, [*cli_args(demo_shards, tmp_path / "runs"), option, value])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {message}"), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists(), "a run folder was made"


# --- 4. a Slurm array with more tasks than shards -----------------------------------------------


def test_an_empty_array_block_makes_nothing(tmp_path):
    job = GenerateConfig(checkpoint="x", out="y", shards=3)
    blocks = [
        shards_for_process(job, {"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "8"})
        for t in range(8)
    ]
    assert sorted(i for b in blocks for i in b) == [0, 1, 2], "each shard once, none twice"
    assert blocks[1] == [] and blocks[0] == []

    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    env = clean_env(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="8")
    done = synthbreast(
        "generate", "--checkpoint", run, "--out", out, "--shards", "3", "--per-shard", "4",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.output[-3000:]
    assert "array task 1's block of the job's 3 shards over 8 tasks is empty" in done.output
    assert "nothing to make" in done.output and "0 shards made" in done.output
    assert not out.exists(), "an empty task touched OUT"


# --- 5. a killed generate's temp files ----------------------------------------------------------


def test_a_killed_generate_leaves_no_temp_file_for_good(tmp_path):
    run, out = make_run(tmp_path / "run"), tmp_path / "out"
    args = ["generate", "--checkpoint", run, "--out", out, "--shards", "2"]
    args += ["--per-shard", "3000", "--batch-size", "100"]
    process = subprocess.Popen(
        [sys.executable, "-m", "synthbreast", *map(str, args)],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while not list(out.glob(".synthetic-*.tar.tmp-*")):
            assert process.poll() is None, "generate finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    (stale,) = out.glob(".synthetic-*.tar.tmp-*")

    done = synthbreast(*args)
    assert done.returncode == 0, done.output[-3000:]
    assert f"removed 1 stale temp file(s) of a killed generate from {out} ({stale.name})" in (
        done.output
    )
    assert not list(out.glob(".*.tmp-*"))
    assert verify_shards(out, load_manifest(out)) == []


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    run, out = make_run(tmp_path / "run"), tmp_path / "out"
    out.mkdir()
    busy = out / f".{shard_name(1)}.tmp-{os.getpid()}"
    busy.write_bytes(b"half a shard")
    with open(out / WRITERS, "a") as handle:  # this process: a live writer of OUT
        fcntl.flock(handle, fcntl.LOCK_SH)
        summary = run_generate(
            GenerateConfig(str(run), str(out), shards=2, per_shard=2, shard_range="0:1"),
            env={},
        )
    assert summary["made"] == 1 and summary["stale_temp_files_removed"] == 0
    assert busy.read_bytes() == b"half a shard"


# --- 6. keys and latents differ between classes -----------------------------------------------


def conditional_run(run_dir: Path) -> Path:
    torch.manual_seed(0)
    model = MSGGANConfig(resolution=16, latent_dim=32, width=0.0625, num_classes=2)
    G = Generator(model)
    state = {
        "model_name": "msggan-cond",
        "config": {"class_label": None},
        "model": model.to_dict(),
        "G_ema": G.state_dict(),
        "step": 1,
    }
    save_checkpoint(run_dir, 1, state)
    return run_dir


def test_keys_and_seeds_name_the_class(tmp_path):
    run = conditional_run(tmp_path / "run")
    found = {}
    for label in (0, 1):
        out = tmp_path / f"class{label}"
        run_generate(GenerateConfig(str(run), str(out), 2, 3, class_label=label), env={})
        samples = [s for i in range(2) for s in iter_shard(out / shard_name(i))]
        found[label] = {
            "keys": {s["__key__"] for s in samples},
            "seeds": {json.loads(s["json"])["seed"] for s in samples},
        }
    assert found[0]["keys"].isdisjoint(found[1]["keys"]), "predictions.csv would repeat keys"
    assert "syn-c1-000001-000002" in found[1]["keys"]
    assert found[0]["seeds"].isdisjoint(found[1]["seeds"]), "both classes drew the same latents"

    # an OUT written by an earlier version (no key_scheme in its job) is refused, not mixed
    old = tmp_path / "class1"
    manifest = load_manifest(old)
    del manifest["job"]["key_scheme"]
    save_manifest(old, manifest)
    (old / shard_name(1)).unlink()
    with pytest.raises(UserError, match=r"earlier synthbreast \(key_scheme 1.*new --out"):
        run_generate(GenerateConfig(str(run), str(old), 2, 3, class_label=1), env={})


# --- 7. the fp16 loss scale in the checkpoint -------------------------------------------------


def test_the_fp16_loss_scale_round_trips_through_a_checkpoint(tmp_path):
    # accelerate gives no GradScaler on a CPU (fp16 there has no loss scaling): the round trip
    # of the state the loop saves is tested with torch's own scaler on the CPU
    def make() -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = make()
    for step in range(4):  # an overflow at step 1 halves the scale; growth counts again
        loss = model(torch.ones(2, 3)).sum() * (float("inf") if step == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    saved = scaler.state_dict()
    assert saved["scale"] != 2.0**12 and saved["_growth_tracker"] != 0, saved

    save_checkpoint(tmp_path, 5, {"scaler": scaler_state(scaler)})
    restored, said = make(), []
    load_scaler_state(restored, load_checkpoint(tmp_path)["state"]["scaler"], tmp_path, said.append)
    assert restored.state_dict() == saved and said == []
    # a checkpoint written without it says so and keeps the fresh scale
    fresh = make()
    load_scaler_state(fresh, None, tmp_path, said.append)
    assert fresh.get_scale() == 2.0**12 and "no fp16 loss-scale state" in said[0]
    assert scaler_state(None) is None


# --- 8. a full disk and a read-only output folder -------------------------------------------


@contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (a small one fills up; `ro` is read-only); skip without rights."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full and read-only tests need a tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()}); as root chmod does not stop writes"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def checkpoints_intact(run: Path) -> None:
    """No checkpoint file under a final name that fails its checksum, no half of one."""
    folder = run / CHECKPOINT_DIR
    for path in list_checkpoints(run):
        load_checkpoint(path)
    if folder.is_dir():
        halves = {p.stem for p in folder.glob("ckpt-*.safetensors")}
        assert halves == {p.stem for p in list_checkpoints(run)}, sorted(folder.iterdir())


def test_train_gan_on_a_full_disk_says_how_to_resume(demo_shards, tmp_path):
    # 1400 KiB: the first checkpoint (~900 KB, step 2) fits, the second (step 4) does not
    with tmpfs(tmp_path / "disk", "size=1400k") as disk:
        args = cli_args(demo_shards, disk / "runs", "--kimg", "0.032", "--metric-images", "0")
        line = one_line_error(synthbreast(*args))
        assert "ckpt-000000004.safetensors: no space left on the device (ENOSPC)" in line
        assert "rerun the same command with --resume auto" in line
        (run,) = (disk / "runs").iterdir()
        checkpoints_intact(run)
        assert load_checkpoint(run)["step"] == 2
        assert not list((run / CHECKPOINT_DIR).glob(".*.tmp-*"))

        remount(disk, "size=20m")  # space freed: the same command with --resume auto finishes
        done = synthbreast(*args, "--resume", "auto")
        assert done.returncode == 0, done.output[-3000:]
        assert [p.name for p in (disk / "runs").iterdir()] == [run.name]
        checkpoints_intact(run)
        assert load_checkpoint(run)["step"] == 4
        assert not [p for p in run.rglob(".*.tmp-*")], "temp files of the failed try left"


def test_generate_on_a_full_disk_says_how_to_resume(tmp_path):
    run = make_run(tmp_path / "run")
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        out = disk / "out"
        args = ["generate", "--checkpoint", run, "--out", out, "--shards", "6"]
        args += ["--per-shard", "8", "--batch-size", "4"]
        line = one_line_error(synthbreast(*args))
        assert "no space left on the device (ENOSPC)" in line
        assert "rerun the same `synthbreast generate` command" in line
        listed = {s["name"]: s for s in load_manifest(out)["shards"]}
        made = list(out.glob("synthetic-*.tar"))
        assert 0 < len(made) < 6, "the disk should fill up part-way"
        for path in made:  # whatever has a final name is whole and listed
            assert sha256_file(path) == listed[path.name]["sha256"]

        remount(disk, "size=20m")
        done = synthbreast(*args)
        assert done.returncode == 0, done.output[-3000:]
        assert verify_shards(out, load_manifest(out)) == []


def test_a_read_only_out_is_one_line(demo_shards, tmp_path):
    run = make_run(tmp_path / "run")
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        line = one_line_error(synthbreast(*cli_args(demo_shards, read_only / "runs")))
        assert f"{read_only / 'runs'}: the file system is read-only (EROFS)" in line
        assert "--resume auto" in line
        out = read_only / "out"
        line = one_line_error(synthbreast("generate", "--checkpoint", run, "--out", out))
        assert f"{out}: the file system is read-only (EROFS)" in line
        assert not out.exists()
