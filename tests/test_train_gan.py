"""MSG-GAN training: a real 2-process run, exact interrupt-and-resume, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import TrainGANConfig
from synthbreast.errors import UserError
from synthbreast.train import gan
from synthbreast.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from synthbreast.train.gan import apply_budget, load_optimizer_state, train_gan

# tiny: 32 px, 16 channels, batch 8; 6 steps
TINY = dict(kimg=0.048, tick_kimg=0.016, snapshot_kimg=0.048, checkpoint_kimg=0.016, workers=0)


def tiny_config(shards: Path, outdir: Path, **overrides) -> TrainGANConfig:
    config = apply_budget(TrainGANConfig(shards=str(shards), outdir=str(outdir)), "tiny")
    return TrainGANConfig(**{**config.__dict__, **TINY, **overrides})


def cli_args(shards: Path, outdir: Path, *extra: str) -> list[str]:
    args = ["train-gan", str(shards), "--outdir", str(outdir), "--budget", "tiny"]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir)["state"]


@pytest.mark.distributed
def test_two_process_training_writes_checkpoint_and_grid(demo_shards, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "synthbreast"]
    command += cli_args(demo_shards, tmp_path, "--class", "1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = tmp_path.glob("0000*-msggan-gan-class1-32px")
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert stats and all(line["processes"] == 2 for line in stats), "2 ranks did not take part"
    assert stats[-1]["step"] == 6
    state = final_state(run_dir)
    assert state["step"] == 6 and len(state["data"]) == 2  # both ranks' data positions
    assert (run_dir / "config.json").is_file()
    assert list((run_dir / "samples").glob("fakes-*.png"))


def test_interrupted_run_resumes_to_the_same_weights(demo_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run
    args = cli_args(demo_shards, tmp_path / "a", "--kimg", "0.096", "--class", "0")
    plain = subprocess.run(
        [sys.executable, "-m", "synthbreast", *args], capture_output=True, text=True, env=env
    )
    assert plain.returncode == 0, plain.stderr[-3000:]

    args_b = cli_args(demo_shards, tmp_path / "b", "--kimg", "0.096", "--class", "0")
    process = subprocess.Popen(
        [sys.executable, "-m", "synthbreast", *args_b],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / "b").glob("*/checkpoints/*.json")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143, err.decode()[-3000:]
    assert "stopped by SIGUSR1" in out.decode() + err.decode()
    (run_b,) = (tmp_path / "b").iterdir()
    stopped_at = load_checkpoint(run_b)["step"]
    assert stopped_at < 12, "the run finished before the signal"

    resumed = subprocess.run(
        [sys.executable, "-m", "synthbreast", *args_b, "--resume", "auto"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert [p.name for p in (tmp_path / "b").iterdir()] == [run_b.name]  # same run folder
    (run_a,) = (tmp_path / "a").iterdir()
    a, b = final_state(run_a), final_state(run_b)
    assert a["step"] == b["step"] == 12
    for net in ("G", "D", "G_ema"):
        for name, tensor in a[net].items():
            assert torch.equal(tensor, b[net][name]), f"{net}.{name} differs after resume"
    # the resumed run's log has each tick once, with the uninterrupted run's losses
    ticks_a, ticks_b = (
        [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
        for run in (run_a, run_b)
    )
    steps = [t["step"] for t in ticks_a]
    assert steps == sorted(set(steps)) and steps[-1] == 12 and len(steps) > 2
    assert [t["step"] for t in ticks_b] == steps
    assert [t["d_loss"] for t in ticks_b] == [t["d_loss"] for t in ticks_a]


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_state_resumes_exactly_in_the_channels_last_layout(tmp_path, fused):
    """Training runs channels_last, checkpoints store tensors contiguous: the moments come back
    in their parameters' layout, so every Adam (fused ones pair tensors by memory position)
    continues as if never stopped."""
    torch.manual_seed(0)
    weight = torch.randn(32, 16, 3, 3).to(memory_format=torch.channels_last)
    grads = [torch.randn_like(weight) for _ in range(6)]

    def adam(param):
        return torch.optim.Adam([param], lr=2e-3, betas=(0.0, 0.99), eps=1e-8, fused=fused)

    p = torch.nn.Parameter(weight.clone())
    opt = adam(p)
    for grad in grads[:3]:
        p.grad = grad.clone()
        opt.step()
    save_checkpoint(tmp_path, 3, {"opt": opt.state_dict(), "p": p.detach()})
    saved = load_checkpoint(tmp_path)["state"]
    q = torch.nn.Parameter(saved["p"].to(memory_format=torch.channels_last))
    resumed = adam(q)
    load_optimizer_state(resumed, saved["opt"])
    assert resumed.state[q]["exp_avg"].stride() == q.stride()
    for grad in grads[3:]:
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        resumed.step()
    assert torch.equal(p, q)


def test_resume_with_another_optimizer_is_refused(demo_shards, tmp_path):
    train_gan(tiny_config(demo_shards, tmp_path, kimg=0.016, optimizer="rmsprop"))
    with pytest.raises(UserError, match="--optimizer rmsprop"):
        train_gan(tiny_config(demo_shards, tmp_path, kimg=0.032, optimizer="adam", resume="auto"))


def test_missing_pool_and_empty_class_are_clear_errors(demo_shards, tmp_path):
    with pytest.raises(UserError, match="no pool 'nope'"):
        train_gan(tiny_config(demo_shards, tmp_path, pool="nope"))
    with pytest.raises(UserError, match="no images of class 7"):
        train_gan(tiny_config(demo_shards, tmp_path, class_label=7))


def test_resume_from_another_model_config_is_refused(demo_shards, tmp_path):
    train_gan(tiny_config(demo_shards, tmp_path, kimg=0.016))
    with pytest.raises(UserError, match="different model config"):
        train_gan(tiny_config(demo_shards, tmp_path, kimg=0.032, width=1.0, resume="auto"))


def test_corrupt_checkpoint_on_resume_is_a_clear_error(demo_shards, tmp_path):
    run_dir = train_gan(tiny_config(demo_shards, tmp_path, kimg=0.016))
    (latest,) = list_checkpoints(run_dir)[-1:]
    tensors = latest.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(UserError, match="checksum"):
        train_gan(tiny_config(demo_shards, tmp_path, kimg=0.032, resume="auto"))


def test_bf16_mixed_precision_trains(demo_shards, tmp_path):
    # its own process: accelerate's precision is fixed once per process
    args = cli_args(demo_shards, tmp_path, "--kimg", "0.016", "--mixed-precision", "bf16")
    done = subprocess.run([sys.executable, "-m", "synthbreast", *args], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    (run_dir,) = tmp_path.iterdir()
    stats = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["d_loss"])) for line in stats)
    assert json.loads((run_dir / "config.json").read_text())["mixed_precision"] == "bf16"
    # warned where bf16 runs emulated (a CPU without AVX-512 or AMX), and only there
    emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    output = done.stdout.decode() + done.stderr.decode()
    assert ("bf16 on a CPU without native bf16" in output) == emulated, output[-2000:]


def test_cli_dry_run_applies_budget_then_flags(tmp_path):
    result = CliRunner().invoke(
        app, ["train-gan", str(tmp_path), "--budget", "small", "--kimg", "3", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    assert config["budget"] == "small" and config["kimg"] == 3.0 and config["width"] == 1 / 16


def test_the_budgets_class_loss_goes_to_conditional_models_only(tmp_path):
    """`small` trains msggan-cond with the class loss; the same budget for one model per class
    leaves it out, where the flag given for such a model is refused."""
    small = gan.BUDGETS["small"]["class_weight"]
    assert small > 0 and "class_weight" in gan.CONDITIONAL_ONLY

    def dry(*flags: str):
        args = ["train-gan", str(tmp_path), "--budget", "small", *flags, "--dry-run"]
        return CliRunner().invoke(app, args)

    conditional = dry("--model", "msggan-cond")
    assert conditional.exit_code == 0, conditional.output
    assert json.loads(conditional.output)["class_weight"] == small
    per_class = dry("--model", "msggan", "--class", "1")
    assert per_class.exit_code == 0, per_class.output
    assert json.loads(per_class.output)["class_weight"] == 0.0
    refused = dry("--model", "msggan", "--class", "1", "--class-weight", "0.3")
    assert refused.exit_code != 0 and "needs class labels" in refused.output


@pytest.mark.distributed
def test_two_ranks_hold_identical_weights_and_average_their_gradients(demo_shards, tmp_path):
    """2 real gloo ranks (torchrun on the CPU): after every step both hold bit-identical D, G
    and G_ema (a sha256 gathered from each), and every averaged gradient equals the mean of
    the two ranks' own gradients, which differ (each rank has its own images and latents)."""
    probe = Path(__file__).with_name("dist_train_probe.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(probe), str(tmp_path)]
    command += cli_args(demo_shards, tmp_path / "runs", "--class", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = 6
    for rank in ranks:
        assert rank["exit"] == 0
        assert len(rank["weights"]) == steps, "a hash after every step"
        assert [c["net"] for c in rank["grads"]] == ["D", "G"] * steps
        for check in rank["grads"]:
            assert check["equal_to_mean"], check
            assert check["ranks_differ"], "the ranks' own gradients should differ"
    hashes = ranks[0]["weights"]
    assert hashes == ranks[1]["weights"]
    for step, per_rank in enumerate(hashes, 1):
        assert per_rank[0] == per_rank[1], f"the ranks' weights differ after step {step}"
    assert len({per_rank[0] for per_rank in hashes}) == steps, "the weights changed every step"


def test_resume_across_an_epoch_boundary_with_loader_workers(demo_shards, tmp_path):
    """Stopped (SIGUSR1) in epoch 0 and resumed past the end of it, with 2 DataLoader workers:
    the same weights, optimizer moments and data position as a run never stopped. Class 1's
    120 gan-pool images over 2 workers make 14 batches of 8 an epoch; 20 steps cross it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--kimg", "0.16", "--class", "1", "--workers", "2", "--metric-images", "0"]
    plain = subprocess.run(
        [sys.executable, "-m", "synthbreast", *cli_args(demo_shards, tmp_path / "a", *extra)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    args_b = cli_args(demo_shards, tmp_path / "b", *extra)
    process = subprocess.Popen(
        [sys.executable, "-m", "synthbreast", *args_b],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((tmp_path / "b").glob("*/checkpoints/*.json")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err.decode()[-3000:]
    (run_b,) = (tmp_path / "b").iterdir()
    stopped = load_checkpoint(run_b)["state"]
    assert stopped["data"][0][0][0] == 0 and stopped["step"] < 14, "stopped inside epoch 0"

    resumed = subprocess.run(
        [sys.executable, "-m", "synthbreast", *args_b, "--resume", "auto"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run_a,) = (tmp_path / "a").iterdir()
    a, b = final_state(run_a), final_state(run_b)
    assert a["step"] == b["step"] == 20
    assert a["data"] == b["data"] == [[[1, 6]]], "epoch 1, its 6th batch"
    for net in ("G", "D", "G_ema"):
        for name, tensor in a[net].items():
            assert torch.equal(tensor, b[net][name]), f"{net}.{name} differs after resume"
    for opt in ("optG", "optD"):
        for key, moments in a[opt]["state"].items():
            for name, tensor in moments.items():
                assert torch.equal(tensor, b[opt]["state"][key][name]), f"{opt} {key} {name}"
