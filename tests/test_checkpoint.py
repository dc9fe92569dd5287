"""Checkpoints: exact round trip of nested training state, no pickle, corruption is an error."""

from __future__ import annotations

import random

import pytest
import torch

from synthbreast.errors import UserError
from synthbreast.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def training_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "kimg": 1.25,
        "config": {"resolution": 64, "name": "x", "widths": [1, 2]},
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # int keys stay ints, order kept
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact(tmp_path):
    state = training_state()
    save_checkpoint(tmp_path, 7, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded["step"] == 7
    assert_same(state, loaded["state"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1.0)
    optimizer.load_state_dict(loaded["state"]["optimizer"])  # loads back into torch
    assert optimizer.param_groups[0]["lr"] == 1e-4


def test_latest_is_resolved_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-000000003.json",
        "ckpt-000000004.json",
    ]
    assert len(list((tmp_path / "checkpoints").glob("*.safetensors"))) == 2
    assert load_checkpoint(tmp_path)["state"]["w"][0] == 4.0
    one = resolve_checkpoint(tmp_path / "checkpoints" / "ckpt-000000003.safetensors")
    assert load_checkpoint(one)["state"]["w"][0] == 3.0


def test_a_half_left_by_a_kill_is_never_read_and_the_next_save_removes_it(tmp_path):
    # a kill between a save's .safetensors and its .json (what CI's fault suite once hit)
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=2)
    folder = tmp_path / "checkpoints"
    (folder / "ckpt-000000004.json").rename(folder / "set-aside.json")
    (folder / "ckpt-000000001.safetensors").write_bytes(b"a prune's leftover")
    assert load_checkpoint(tmp_path)["state"]["w"][0] == 2.0  # the newest whole checkpoint
    save_checkpoint(tmp_path, 6, {"w": torch.full((2,), 6.0)}, keep=2)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "ckpt-000000002.safetensors",
        "ckpt-000000006.safetensors",
    ]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(100)})
    tensors = next((tmp_path / "checkpoints").glob("*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-10] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoints"):
        load_checkpoint(tmp_path)


def test_objects_that_would_need_pickle_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot store"):
        save_checkpoint(tmp_path, 1, {"fn": object()})


def test_an_outdir_with_one_run_resolves_to_that_run(tmp_path):
    run = tmp_path / "00000-msggan-gan-class1-64px"
    save_checkpoint(run, 5, {"w": torch.zeros(1)})
    (tmp_path / "00001-msggan-gan-class1-64px").mkdir()  # started, no checkpoint yet
    assert resolve_checkpoint(tmp_path) == run / "checkpoints" / "ckpt-000000005.json"
    save_checkpoint(tmp_path / "00002-msggan-gan-class0-64px", 1, {"w": torch.zeros(1)})
    with pytest.raises(UserError, match="several runs"):
        resolve_checkpoint(tmp_path)
