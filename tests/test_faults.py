"""Fault injection with real processes: every stage SIGKILLed at seeded random moments, then
rerun as a user would (the same command; `--resume` where the stage asks for it), must finish
with the bytes, weights and metrics of an uninterrupted run. A full disk (a small tmpfs) and a
read-only OUT (a read-only tmpfs: we run as root, which chmod does not stop) give one line and
leave no file under a final name that fails its checksum.

Kill points are few and chosen to land inside the work: each waits for a seeded random count of
the stage's own outputs (shards, log lines, cached features) and then a seeded random delay, and
kills the whole process group (torchrun's workers and DataLoader workers too). How many were
tried, and how many landed before the process finished, is printed (-s) and recorded as the
test's `kill_points` property.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from synthbreast.data.shards import MANIFEST, load_manifest, verify_shards
from synthbreast.eval.metrics import result_problem
from synthbreast.fileio import sha256_file
from synthbreast.train.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint
from tests.test_generate import make_run
from tests.test_scenarios import make_synthetic

REPO = Path(__file__).resolve().parents[1]
SEED = 13
KILLS = 2  # per stage: 4 stages, 8 kill points in all
SPLIT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
TALLY: list[tuple[str, str, bool]] = []  # (stage, kill point, landed before the end)


def env() -> dict[str, str]:
    """One thread per process (the same arithmetic in every run), no array/rank variables."""
    clean = {k: v for k, v in os.environ.items() if k not in SPLIT_VARS}
    return {**clean, "OMP_NUM_THREADS": "1"}


def synthbreast(*args, torchrun: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(*args, torchrun=torchrun), capture_output=True, text=True, cwd=REPO, env=env(),
        timeout=timeout,
    )  # fmt: skip
    done.output = done.stdout + done.stderr
    return done


def command(*args, torchrun: int = 0) -> list[str]:
    launch = [sys.executable, "-m"]
    if torchrun:
        launch += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
        launch += ["-m"]
    return [*launch, "synthbreast", *map(str, args)]


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.output[-3000:]
    return done.output


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.output[-3000:]
    assert "Traceback" not in done.output, done.output[-3000:]
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.output[-3000:]
    return errors[0]


def kill_at(
    stage: str, args: list, ready: Callable[[], bool], delay: float, point: str, torchrun: int = 0
) -> bool:
    """Start the stage, wait until `ready()`, then `delay` seconds, then SIGKILL its process
    group. Returns whether it was still running (False: it finished first)."""
    process = subprocess.Popen(
        command(*args, torchrun=torchrun), cwd=REPO, env=env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while process.poll() is None and not ready():
            assert time.monotonic() < deadline, f"{stage}: {point} not reached in 300 s"
            time.sleep(0.005)
        time.sleep(delay)
        landed = process.poll() is None
        if landed:
            os.killpg(process.pid, signal.SIGKILL)  # the group this test started
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    if not landed:
        assert process.returncode == 0, process.stderr.read().decode()[-3000:]
    process.stderr.close()
    TALLY.append((stage, point, landed))
    return landed


@pytest.fixture
def tally(record_property):
    """Print and record the kill points a test tried."""
    before = len(TALLY)
    yield
    mine = TALLY[before:]
    landed = sum(1 for *_, hit in mine)
    record_property("kill_points", len(mine))
    record_property("kill_points_landed", landed)
    print(f"\n[faults] {len(mine)} kill points tried, {landed} landed mid-run:")
    for stage, point, hit in mine:
        print(f"[faults]   {stage}: {point} -> {'killed' if hit else 'finished first'}")
    print(f"[faults] suite total so far: {len(TALLY)} kill points")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp-*")]


# --- ingest ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    """6 patients x 2 classes x 10 patches: 30 shards of 4, written in about a second."""
    out = tmp_path_factory.mktemp("fault-demo") / "idc"
    ok(synthbreast("demo-data", out, "--patients", "6", "--per-class", "10"))
    return out


INGEST = ["--shard-size", "4", "--min-shards", "2", "--workers", "2"]


def shard_list(out: Path) -> list[tuple[str, str]]:
    return [(s["name"], s["sha256"]) for s in load_manifest(out)["shards"]]


def final_shards_intact(out: Path) -> None:
    """Every shard under its final name is listed in the manifest with its sha256."""
    tars = sorted(p.name for p in out.glob("*.tar"))
    if not tars:
        return
    listed = dict(shard_list(out))
    for name in tars:
        assert name in listed, f"{name} under its final name is not in the manifest"
        assert sha256_file(out / name) == listed[name], f"{name} fails its checksum"


def rerun_ingest(src: Path, out: Path) -> str:
    """What a user does after a kill: --resume; where nothing was recorded yet, the one-line
    refusal says --overwrite, and that is run."""
    done = synthbreast("ingest", src, out, *INGEST, "--resume")
    if done.returncode == 2 and "use --overwrite" in one_line_error(done):
        done = synthbreast("ingest", src, out, *INGEST, "--overwrite")
    return ok(done)


def test_killed_ingest_reruns_to_the_same_shards(small_demo, tmp_path, tally):
    reference = tmp_path / "reference"
    ok(synthbreast("ingest", small_demo, reference, *INGEST))
    expected = shard_list(reference)
    rng = random.Random(f"{SEED}:ingest")
    for i in range(KILLS):
        out = tmp_path / f"killed-{i}"
        count, delay = rng.randint(1, len(expected) - 1), rng.uniform(0, 0.05)
        point = f"after {count} of {len(expected)} shards + {delay * 1000:.0f} ms"
        args = ["ingest", small_demo, out, *INGEST]
        kill_at("ingest", args, lambda out=out, n=count: len(list(out.glob("*.tar"))) >= n,
                delay, point)  # fmt: skip
        final_shards_intact(out)
        rerun_ingest(small_demo, out)
        assert shard_list(out) == expected, f"{point}: other shards than the uninterrupted run"
        assert verify_shards(out, load_manifest(out)) == []
        assert load_manifest(out)["pools"] == load_manifest(reference)["pools"]
        assert not temp_files(out), temp_files(out)


# --- train-gan ---------------------------------------------------------------------------------

# 16 steps of batch 8 on class 1's 120 gan-pool images over 2 DataLoader workers (14 batches an
# epoch): the kills and resumes cross the epoch boundary. A tick and a checkpoint every 2 steps.
TRAIN = ["--budget", "tiny", "--class", "1", "--kimg", "0.128", "--tick-kimg", "0.016",
         "--checkpoint-kimg", "0.016", "--snapshot-kimg", "0.064", "--metric-images", "16",
         "--workers", "2"]  # fmt: skip
NETS = ("G", "D", "G_ema", "optG", "optD")


def finished_run(outdir: Path) -> Path:
    """The run folder holding the final checkpoint (a kill before the first checkpoint leaves
    a folder without one; --resume auto then starts the next)."""
    done = [run for run in sorted(outdir.iterdir()) if list_checkpoints(run)]
    assert len(done) == 1, done
    return done[0]


def jsonl(path: Path, drop: tuple[str, ...]) -> list[dict]:
    lines = [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def tensors_of(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state, by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state or [])
    found = {}
    for key, value in items:
        if isinstance(value, (dict, list, tuple, torch.Tensor)):
            found.update(tensors_of(value, f"{prefix}.{key}"))
    return found


def checkpoints_intact(run: Path) -> None:
    folder = run / CHECKPOINT_DIR
    for path in list_checkpoints(run):
        load_checkpoint(path)  # verifies the .safetensors against the sha256 in the .json
    if folder.is_dir():
        assert not [p for p in lone_halves(run) if not being_saved_or_pruned(run, p.stem)]


def lone_halves(run: Path) -> list[Path]:
    """The .safetensors files without their .json."""
    named = {p.stem for p in list_checkpoints(run)}
    return [p for p in (run / CHECKPOINT_DIR).glob("ckpt-*.safetensors") if p.stem not in named]


def being_saved_or_pruned(run: Path, stem: str) -> bool:
    # a kill between a save's .safetensors and its .json leaves a half newer than every
    # checkpoint; one between a prune's .json and its .safetensors, a half older than every
    # checkpoint. Neither is ever read (a checkpoint is its .json); the next save removes both.
    kept = [p.stem for p in list_checkpoints(run)]
    return not kept or stem < kept[0] or stem > kept[-1]


def test_killed_training_resumes_to_the_same_weights_and_metrics(demo_shards, tmp_path, tally):
    reference = tmp_path / "reference"
    ok(synthbreast("train-gan", demo_shards, "--outdir", reference, *TRAIN))
    ref_run = finished_run(reference)
    ref_state = load_checkpoint(ref_run)["state"]
    assert ref_state["step"] == 16 and ref_state["data"] == [[[1, 2]]], "epoch 1, its 2nd batch"
    rng = random.Random(f"{SEED}:train-gan")
    for i in range(KILLS):
        outdir = tmp_path / f"killed-{i}"
        ticks, delay = rng.randint(1, 7), rng.uniform(0, 0.5)
        point = f"after tick {ticks} of 8 + {delay * 1000:.0f} ms"

        def ready(outdir=outdir, n=ticks) -> bool:
            stats = list(outdir.glob("*/stats.jsonl"))
            return bool(stats) and stats[0].read_text().count("\n") >= n

        kill_at("train-gan", ["train-gan", demo_shards, "--outdir", outdir, *TRAIN], ready,
                delay, point)  # fmt: skip
        for run in outdir.iterdir():
            checkpoints_intact(run)
            if i == 0 and (run / "stats.jsonl").is_file():  # a kill inside a log append
                with open(run / "stats.jsonl", "a") as f:
                    f.write('{"step": 99, "kimg": 0.7')
        output = ok(synthbreast("train-gan", demo_shards, "--outdir", outdir, *TRAIN,
                                "--resume", "auto"))  # fmt: skip
        run = finished_run(outdir)
        state = load_checkpoint(run)["state"]
        assert state["step"] == 16, output[-2000:]
        want, got = (
            tensors_of({n: ref_state[n] for n in NETS}),
            tensors_of({n: state[n] for n in NETS}),
        )
        assert want.keys() == got.keys()
        differ = [name for name in want if not torch.equal(want[name], got[name])]
        assert not differ, f"{point}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        assert state["data"] == ref_state["data"], "the data positions"
        timing = ("img_per_s", "seconds")
        assert jsonl(run / "stats.jsonl", timing) == jsonl(ref_run / "stats.jsonl", timing)
        metric = "metric-texture.jsonl"
        assert jsonl(run / metric, timing) == jsonl(ref_run / metric, timing)
        assert not temp_files(outdir), temp_files(outdir)
        assert not lone_halves(run), f"{point}: the resumed run left {lone_halves(run)}"


# --- generate (2 processes) --------------------------------------------------------------------

GENERATE = ["--shards", "6", "--per-shard", "200", "--batch-size", "50"]


def test_killed_two_process_generate_reruns_to_the_same_shards(tmp_path, tally):
    run = make_run(tmp_path / "gan" / "00000-tiny")
    reference = tmp_path / "reference"
    ok(synthbreast("generate", "--checkpoint", run, "--out", reference, *GENERATE))
    expected = shard_list(reference)
    assert len(expected) == 6
    rng = random.Random(f"{SEED}:generate")
    for i in range(KILLS):
        out = tmp_path / f"killed-{i}"
        count, delay = rng.randint(0, 4), rng.uniform(0, 0.3)
        point = f"after {count} of 6 shards + {delay * 1000:.0f} ms (2 processes)"
        args = ["generate", "--checkpoint", run, "--out", out, *GENERATE]

        def ready(out=out, n=count) -> bool:
            return (out / MANIFEST).is_file() and len(list(out.glob("*.tar"))) >= n

        kill_at("generate", args, ready, delay, point, torchrun=2)
        if (out / MANIFEST).is_file():
            final_shards_intact(out)
        ok(synthbreast(*args, torchrun=2))
        assert sorted(shard_list(out)) == sorted(expected), f"{point}: other shard bytes"
        assert verify_shards(out, load_manifest(out)) == []
        assert load_manifest(out)["status"] == "complete"
        assert not temp_files(out), temp_files(out)


# --- classify ----------------------------------------------------------------------------------

CLASSIFY = ["--scenario", "synth-synth", "--weights", "none", "--input-size", "native",
            "--epochs", "3", "--batch-size", "8"]  # fmt: skip
RUN_ONLY = ("seconds", "model")  # timing, and feature_shards computed/reused (compared below)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("fault-synthetic"), 2, 8, 32)


def classify_result(out: Path) -> tuple[dict, bytes, dict[str, bytes]]:
    """metrics.json but for timing and paths inside OUT, predictions.csv's bytes, and the
    bytes of every tensor of model.safetensors (its metadata holds the config, with OUT)."""
    run = out / "synth-synth"
    metrics = json.loads((run / "metrics.json").read_text())
    # feature_shards: computed now or read back; feature_cache: a path inside this OUT
    model = {
        k: v for k, v in metrics["model"].items() if k not in ("feature_shards", "feature_cache")
    }
    kept = {k: v for k, v in metrics.items() if k not in RUN_ONLY} | {"model": model}
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        weights = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118
    return kept, (run / "predictions.csv").read_bytes(), weights


def classify_outputs_intact(out: Path) -> None:
    """Whatever has a final name is whole: a readable result, loadable safetensors."""
    for path in out.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            assert f.keys(), path
    metrics = out / "synth-synth" / "metrics.json"
    if metrics.is_file():
        assert result_problem(json.loads(metrics.read_text())) is None


@pytest.fixture(scope="module")
def classify_reference(synthetic, tmp_path_factory) -> tuple[dict, bytes, dict[str, bytes]]:
    """The uninterrupted run's result."""
    reference = tmp_path_factory.mktemp("classify-reference")
    ok(synthbreast("classify", "--synthetic", synthetic, "--out", reference, *CLASSIFY))
    return classify_result(reference)


def test_killed_classify_reruns_to_the_same_metrics(synthetic, classify_reference, tmp_path, tally):
    expected = classify_reference
    rng = random.Random(f"{SEED}:classify")
    for i in range(KILLS):
        out = tmp_path / f"killed-{i}"
        count, delay = rng.randint(0, 3), rng.uniform(0, 1.0)
        point = f"after {count} of 4 cached feature shards + {delay * 1000:.0f} ms"
        args = ["classify", "--synthetic", synthetic, "--out", out, *CLASSIFY]

        def ready(out=out, n=count) -> bool:
            return (out / "synth-synth").is_dir() and len(
                list(out.glob("features/*/*.safetensors"))
            ) >= n

        kill_at("classify", args, ready, delay, point)
        classify_outputs_intact(out)
        output = ok(synthbreast(*args))
        assert "Traceback" not in output
        got = classify_result(out)
        differ = [k for k in expected[0] if got[0].get(k) != expected[0][k]]
        assert not differ, f"{point}: metrics.json differs in {differ}"
        assert got[1:] == expected[1:], f"{point}: other predictions.csv or model.safetensors"
        assert not temp_files(out), temp_files(out)


# --- a full disk and a read-only OUT -----------------------------------------------------------


@contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs at `path` (small: it fills up; `ro`: read-only); skip where mount is refused."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full and read-only tests need a tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode:
        why = f"cannot mount a tmpfs here ({done.stderr.strip()})"
        pytest.skip(f"{why}: as root, chmod does not stop writes; nothing else fills or locks OUT")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def test_ingest_on_a_full_disk_is_one_line_and_resumes(small_demo, tmp_path):
    reference = tmp_path / "reference"
    ok(synthbreast("ingest", small_demo, reference, *INGEST))
    with tmpfs(tmp_path / "disk", "size=160k") as disk:
        out = disk / "out"
        line = one_line_error(synthbreast("ingest", small_demo, out, *INGEST))
        assert "no space left on the device (ENOSPC)" in line and "--resume" in line, line
        final_shards_intact(out)
        assert 0 < len(list(out.glob("*.tar"))) < len(shard_list(reference)), "filled part-way"
        remount(disk, "size=20m")
        ok(synthbreast("ingest", small_demo, out, *INGEST, "--resume"))
        assert shard_list(out) == shard_list(reference)
        assert not temp_files(out)


def test_classify_on_a_full_disk_is_one_line_and_reruns(synthetic, classify_reference, tmp_path):
    # the features and predictions fit, the ResNet's 45 MB model.safetensors does not
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        out = disk / "out"
        args = ["classify", "--synthetic", synthetic, "--out", out, *CLASSIFY]
        line = one_line_error(synthbreast(*args))
        assert "no space left on the device (ENOSPC)" in line, line
        assert "rerun the same" in line
        classify_outputs_intact(out)
        assert not (out / "synth-synth" / "metrics.json").exists()
        assert not temp_files(out), "a half-written temp file fills the disk"
        remount(disk, "size=200m")
        ok(synthbreast(*args))
        assert classify_result(out) == classify_reference, "another result"


def test_a_read_only_out_is_one_line_for_ingest_and_classify(small_demo, synthetic, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        line = one_line_error(synthbreast("ingest", small_demo, read_only / "shards", *INGEST))
        assert "the file system is read-only (EROFS)" in line, line
        args = ["classify", "--synthetic", synthetic, "--out", read_only / "c", *CLASSIFY]
        line = one_line_error(synthbreast(*args))
        assert "the file system is read-only (EROFS)" in line, line
        assert not any(read_only.iterdir())
