"""An ingest killed part-way (SIGKILL) leaves only whole, verified shards; a rerun completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from synthbreast.config import IngestConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.shards import MANIFEST, load_manifest, verify_shards
from synthbreast.fileio import sha256_file


def start_and_kill(src: Path, out: Path) -> None:
    """Start `synthbreast ingest` with tiny shards and SIGKILL it once its first shard lands."""
    command = [sys.executable, "-m", "synthbreast", "ingest", str(src), str(out)]
    command += ["--shard-size", "2", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "ingest wrote no shard in 120 s"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_ingest_leaves_no_bad_shard_and_reruns(demo_dir, tmp_path):
    out = tmp_path / "out"
    start_and_kill(demo_dir, out)
    manifest = load_manifest(out)
    assert manifest["status"] == "incomplete", "the ingest finished before it was killed"
    listed = {s["name"]: s["sha256"] for s in manifest["shards"]}
    on_disk = sorted(out.glob("*.tar"))
    assert on_disk, "no shard to check"
    for path in on_disk:
        assert path.name in listed, f"{path.name} on disk but not in the manifest"
        assert sha256_file(path) == listed[path.name], f"{path.name} fails its checksum"
    assert len(on_disk) < 100  # 480 samples at 2 per shard: the run was cut short

    # A rerun over the same folder needs --overwrite (or --resume) and completes.
    rerun = [sys.executable, "-m", "synthbreast", "ingest", str(demo_dir), str(out)]
    rerun += ["--shard-size", "2", "--workers", "1"]
    refused = subprocess.run(rerun, capture_output=True, text=True)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    done = subprocess.run([*rerun, "--overwrite"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert verify_shards(out, load_manifest(out)) == []
    assert not list(out.glob(".*.tmp-*")), "a temporary file was left behind"


def test_killed_ingest_resumes_where_it_stopped(demo_dir, tmp_path):
    out = tmp_path / "out"
    start_and_kill(demo_dir, out)
    # The manifest lists a shard just before its rename, so a kill between the two leaves one
    # listed shard that is not on disk yet: only the listed shards that are on disk count.
    written = sum((out / s["name"]).is_file() for s in load_manifest(out)["shards"])
    resumed = run_ingest(
        IngestConfig(src=str(demo_dir), out=str(out), shard_size=2, workers=1, resume=True)
    )
    assert resumed["resumed_shards"] == written > 0
    clean = run_ingest(IngestConfig(src=str(demo_dir), out=str(tmp_path / "clean"), shard_size=2))
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert verify_shards(out, load_manifest(out)) == []
    assert (out / MANIFEST).is_file()
