"""SinGAN: the pyramid, training one image (resume after SIGKILL is exact), many images as
separate processes (one failing leaves the others), and generation into shards (reproducible,
grey and RGB, never a copy of the source). Tiny configs on the CPU: 32-48 px, 2-3 scales."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import IngestConfig, TrainSinGANConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.shards import iter_shard, load_manifest, verify_pool
from synthbreast.models.registry import MODELS, get_model
from synthbreast.models.singan import (
    SinGAN,
    SinGANConfig,
    build_discriminators,
    image_pyramid,
    plan_scales,
)
from synthbreast.train.singan import apply_budget, load_model, train_model

REPO = Path(__file__).resolve().parents[1]
# 2 scales (16, 32 px) of 20 iterations: a model in about a second of compute
FAST = ["--budget", "tiny", "--max-size", "32", "--iterations", "20", "--device", "cpu"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "synthbreast", *args], capture_output=True, text=True, env=env
    )


# --- the pyramid ------------------------------------------------------------------------------


def test_scales_as_the_paper():
    # 250 px (the paper's max): 10 scales from 25 px, factor (25/250)^(1/9)
    sizes, factor = plan_scales(250, 250, 25, 250, 0.75)
    assert len(sizes) == 10 and sizes[0] == [25, 25] and sizes[-1] == [250, 250]
    assert factor == pytest.approx(0.1 ** (1 / 9))
    # a mammogram is shrunk to 250 first; a 128 px patch keeps its size (7 scales)
    assert plan_scales(1024, 1024, 25, 250, 0.75)[0] == sizes
    small = plan_scales(128, 128, 25, 128, 0.75)[0]
    assert len(small) == 7 and small[0] == [25, 25] and small[-1] == [128, 128]
    # not square: the shorter side reaches min_size
    rect = plan_scales(50, 40, 25, 250, 0.75)[0]
    assert rect[0] == [31, 25] and rect[-1] == [50, 40]
    assert all(a < b for (a, _), (b, _) in itertools.pairwise(rect))


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_grey_and_rgb(channels):
    config = SinGANConfig.for_image(48, 40, channels, min_size=16, max_size=48, nfc=8)
    G, Ds = SinGAN(config), build_discriminators(config)
    assert [list(x.shape[-2:]) for x in G.reconstruct()] == config.sizes
    out = G.sample(3, torch.Generator().manual_seed(0))
    assert out.shape == (3, channels, 48, 40) and torch.isfinite(out).all()
    for n, size in enumerate(config.sizes):
        scores = Ds[n](torch.zeros(2, channels, *size))
        assert scores.shape[:2] == (2, 1)  # a map of patch scores
    # channels double every 4 scales up to max_nfc
    wide = SinGANConfig.for_image(250, 250, 3, nfc=32, max_nfc=128)
    assert [wide.scale_channels(n) for n in range(10)] == [32] * 4 + [64] * 4 + [128] * 2


def test_samples_do_not_depend_on_their_batch():
    # instance norm (BatchNorm at batch 1, as the paper trains) keeps samples independent
    config = SinGANConfig.for_image(32, 32, 3, min_size=16, max_size=32, nfc=8)
    G = SinGAN(config).eval()
    torch.manual_seed(1)
    noise = [torch.randn(3, *G.noise_shape(n, 1)[1:]) for n in range(config.num_scales)]

    def run(batch):
        prev = torch.zeros(len(batch), 3, *config.sizes[0])
        for n in range(config.num_scales):
            if n:
                prev = torch.nn.functional.interpolate(prev, size=tuple(config.sizes[n]),
                                                       mode="bicubic")  # fmt: skip
            prev = G.scale_forward(n, noise[n][batch], prev)
        return prev

    together = run([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(run([i])[0], together[i], atol=1e-5, rtol=1e-5)


def test_config_round_trip_and_refusals():
    config = SinGANConfig.for_image(48, 48, 1, min_size=16, max_size=48, nfc=8, layers=3)
    again = SinGANConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown"):
        SinGANConfig.from_dict({**config.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="too small"):
        SinGANConfig.for_image(48, 48, 1, min_size=8, max_size=48, layers=5)
    with pytest.raises(ValueError, match="channels"):
        SinGANConfig(channels=2, sizes=[[16, 16]])


def test_registry_names_the_trainer():
    assert MODELS["singan"].trainer == "singan" and MODELS["msggan"].trainer == "gan"
    from synthbreast.errors import UserError

    with pytest.raises(UserError, match="synthbreast train-singan"):
        get_model("singan")  # what train-gan asks for
    assert get_model("singan", trainer="singan").config_type is SinGANConfig


# --- training one image ---------------------------------------------------------------------


def checkered(side: int, channels: int) -> torch.Tensor:
    """A test image with structure at several scales, in [-1, 1]."""
    y, x = np.mgrid[0:side, 0:side]
    big = ((x // 12 + y // 12) % 2).astype(np.float32)
    fine = np.sin(x / 2.0) * 0.3
    pixels = np.clip(big * 1.4 - 0.7 + fine, -1, 1)
    image = torch.from_numpy(pixels)[None, None].float()
    return image.repeat(1, channels, 1, 1)


def test_train_one_image_learns_its_reconstruction(tmp_path):
    torch.set_num_threads(1)
    config = apply_budget(TrainSinGANConfig(shards="-", class_label=0), "tiny")
    image = checkered(48, 3)
    summary = train_model(config, image, tmp_path / "m", torch.device("cpu"), say=print)
    assert [s["scale"] for s in summary["scales"]] == [0, 1, 2]
    assert summary["noise_amp"][0] == 1.0 and all(a > 0 for a in summary["noise_amp"][1:])
    (tmp_path / "m" / "model.json").write_text(json.dumps({**summary, "channels": 3}))
    G, _ = load_model(tmp_path / "m")
    reals = image_pyramid(image, G.config.sizes)
    with torch.no_grad():
        rec = G.reconstruct()[-1]
        untrained = SinGAN(G.config).reconstruct()[-1]
    error = torch.nn.functional.mse_loss(rec, reals[-1]).item()
    baseline = torch.nn.functional.mse_loss(untrained, reals[-1]).item()
    assert error < 0.25 * baseline, (error, baseline)
    assert (tmp_path / "m" / "samples.png").is_file()
    # every scale's files: weights of G and D, the noise amplitude, z_rec at scale 0
    tensors = load_file(str(tmp_path / "m" / "scales" / "scale-00.safetensors"))
    assert "z_rec" in tensors and "noise_amp" in tensors
    assert any(k.startswith("G.") for k in tensors) and any(k.startswith("D.") for k in tensors)
    assert not list((tmp_path / "m" / "checkpoints").glob("ckpt-*"))  # done: none left


# --- shards to train on ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grey_shards(tmp_path_factory) -> Path:
    """1-channel shards of an image folder: 2 classes x 4 patients x 2 images of 40 px."""
    root = tmp_path_factory.mktemp("grey")
    src = root / "src"
    rng = np.random.default_rng(0)
    for label in (0, 1):
        (src / str(label)).mkdir(parents=True)
        for patient in range(4):
            for k in range(2):
                base = checkered(40, 1)[0, 0].numpy() * (0.5 + 0.2 * k)
                noise = rng.normal(0, 0.1, base.shape)
                pixels = ((np.clip(base + noise, -1, 1) + 1) * 127.5).astype(np.uint8)
                name = f"p{patient}_{label}{k}.png"
                Image.fromarray(pixels, "L").save(src / str(label) / name)
    out = root / "shards"
    run_ingest(
        IngestConfig(src=str(src), out=str(out), format="imagefolder", patch_size=40,
                     patient_regex=r"^(?P<patient>p\d+)_", gan_fraction=0.5, min_shards=1,
                     shard_size=10)
    )  # fmt: skip
    assert load_manifest(out)["sample"]["channels"] == 1
    return out


def model_dirs(outdir: Path) -> list[Path]:
    return sorted((outdir / "models").iterdir())


def scale_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((model_dir / "scales").glob("scale-*.safetensors")):
        for key, value in load_file(str(path)).items():
            tensors[f"{path.stem}.{key}"] = value
    return tensors


def test_resume_after_sigkill_mid_scale_is_exact(grey_shards, tmp_path):
    args = [str(grey_shards), "--class", "1", "--images", "1", "--budget", "tiny",
            "--max-size", "32", "--iterations", "40", "--device", "cpu"]  # fmt: skip
    reference = run_cli("train-singan", *args, "--outdir", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr

    # the same job, SIGKILLed once a mid-scale checkpoint is on disk, then run again
    outdir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "synthbreast", "train-singan", *args, "--outdir",
               str(outdir), "--task-id", "0"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if outdir.is_dir() and list(outdir.glob("models/*/checkpoints/ckpt-*.json")):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (model_dir,) = model_dirs(outdir)
    assert not (model_dir / "model.json").exists(), "the kill came after the model was done"
    assert list(model_dir.glob("checkpoints/ckpt-*.json"))
    again = run_cli("train-singan", *args, "--outdir", str(outdir))
    assert again.returncode == 0, again.stderr
    assert "resumes at iteration" in again.stdout + again.stderr

    (ref_dir,) = model_dirs(tmp_path / "ref")
    expected, got = scale_tensors(ref_dir), scale_tensors(model_dir)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_one_failing_model_leaves_the_others_and_is_rerun_alone(grey_shards, tmp_path):
    outdir = tmp_path / "run"
    args = ["train-singan", str(grey_shards), "--class", "0", "--images", "3", "--outdir",
            str(outdir), *FAST]  # fmt: skip
    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["images"] == 3
    # model 1's folder cannot be made: a file stands where it goes
    selection = run_cli(*args[:-2], "--task-id", "0", "--device", "cpu")
    assert selection.returncode == 0, selection.stderr
    chosen = json.loads((outdir / "selection.json").read_text())["images"]
    assert [c["index"] for c in chosen] == [0, 1, 2] and len({c["key"] for c in chosen}) == 3
    blocker = outdir / chosen[1]["model_dir"]
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")

    first = run_cli(*args)
    assert first.returncode == 2
    assert "models 1 failed" in first.stdout + first.stderr
    done = {p.name: (p / "model.json").read_bytes() for p in model_dirs(outdir) if p.is_dir()}
    assert sorted(done) == sorted(Path(chosen[i]["model_dir"]).name for i in (0, 2))
    before = {name: scale_tensors(outdir / "models" / name) for name in done}

    blocker.unlink()
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "1 models trained, 2 already complete" in second.stdout + second.stderr
    for name, data in done.items():  # the others untouched
        assert (outdir / "models" / name / "model.json").read_bytes() == data
        after = scale_tensors(outdir / "models" / name)
        assert all(torch.equal(before[name][k], after[k]) for k in after)
    assert (outdir / chosen[1]["model_dir"] / "model.json").is_file()


# --- generation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grey_models(grey_shards, tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("singan") / "run"
    result = run_cli("train-singan", str(grey_shards), "--class", "1", "--images", "2",
                     "--outdir", str(outdir), *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return outdir


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("synthetic-*.tar"))}


@pytest.mark.parametrize("inject", [0, 1])
def test_generate_shards_reproducible_never_the_source(grey_models, tmp_path, inject):
    common = ["generate-singan", str(grey_models), "--shards", "2", "--per-shard", "5",
              "--inject-scale", str(inject), "--batch-size", "2"]  # fmt: skip
    whole = run_cli(*common, "--out", str(tmp_path / "a"))
    assert whole.returncode == 0, whole.stderr
    # shard by shard, in another order: the same bytes
    for shard_range in ("1:2", "0:1"):
        part = run_cli(*common, "--out", str(tmp_path / "b"), "--shard-range", shard_range)
        assert part.returncode == 0, part.stderr
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert len(shard_bytes(tmp_path / "a")) == 2

    out = tmp_path / "a"
    manifest = load_manifest(out)
    paths = verify_pool(out, manifest, "synthetic")
    assert manifest["sample"] == {"keys": ["__key__", "png", "cls", "json"], "image_size": 40,
                                  "channels": 1}  # fmt: skip
    assert json.loads((out / "config.json").read_text())["job"] == "GenerateSinGANConfig"
    sources = {}
    for model_dir in model_dirs(grey_models):
        sources[model_dir.name] = np.asarray(Image.open(model_dir / "source.png"))
    models_used = []
    for path in paths:
        for sample in iter_shard(path):
            meta = json.loads(sample["json"])
            image = Image.open(io.BytesIO(sample["png"]))
            assert image.mode == "L" and image.size == (40, 40)
            assert int(sample["cls"]) == 1 and meta["inject_scale"] == inject
            source = sources[Path(meta["model_dir"]).name]
            assert not np.array_equal(np.asarray(image), source)  # never its source
            models_used.append(meta["model"])
            assert meta["source_key"] and meta["model_sha256"]
    # every model gives its share (10 images over 2 models)
    assert sorted(models_used.count(m) for m in (0, 1)) == [5, 5]


def test_generate_refuses_another_job_and_bad_options(grey_models, tmp_path):
    out = tmp_path / "out"
    base = ["generate-singan", str(grey_models), "--out", str(out), "--shards", "1",
            "--per-shard", "2"]  # fmt: skip
    assert run_cli(*base).returncode == 0
    again = run_cli(*base, "--seed", "5")
    assert again.returncode == 2 and "another job" in again.stderr + again.stdout
    assert "Traceback" not in again.stderr
    runner = CliRunner()
    bad = runner.invoke(app, [*base[:2], "--out", str(tmp_path / "x"), "--inject-scale", "9"])
    assert bad.exit_code == 2 and "--inject-scale 9" in bad.output
    bad = runner.invoke(app, [*base[:2], "--out", str(tmp_path / "y"), "--num-models", "7"])
    assert bad.exit_code == 2 and "--num-models 7" in bad.output
    bad = runner.invoke(app, ["generate-singan", str(tmp_path), "--out", str(tmp_path / "z")])
    assert bad.exit_code == 2 and "not a `synthbreast train-singan` --outdir" in bad.output


def test_train_singan_bad_options_are_one_line(grey_shards, tmp_path):
    runner = CliRunner()
    base = ["train-singan", str(grey_shards), "--outdir", str(tmp_path / "o"), "--dry-run"]
    cases = [
        ([], "--class is required"),
        (["--class", "1", "--images", "0"], "--images 0"),
        (["--class", "1", "--min-size", "6"], "--min-size 6"),
        (["--class", "1", "--task-id", "4"], "--task-id 4"),
        (["--class", "1", "--budget", "tiny", "--max-size", "8"], "--max-size 8"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) <= 2  # one line, wrapped at most once
    # too many images for the pool: named with the fix
    result = runner.invoke(app, [*base[:-1], "--class", "1", "--images", "50"])
    assert result.exit_code == 2 and "lower --images" in result.output
    # the dry run prints the job's config
    result = runner.invoke(app, [*base, "--class", "1", "--budget", "small"])
    assert result.exit_code == 0
    printed = json.loads(result.output)
    assert printed["job"] == "TrainSinGANConfig" and printed["max_size"] == 128
    assert not (tmp_path / "o").exists()
