"""Checkpoints as safetensors plus JSON: no pickle, written atomically, verified on load.

A checkpoint is two files in a run's `checkpoints/` folder:
  ckpt-<step>.safetensors   every tensor (weights, optimizer moments, RNG states)
  ckpt-<step>.json          everything else (nesting, step, config, RNG of python/numpy), plus
                            the sha256 of the .safetensors file
The .json is renamed into place last, so a checkpoint exists only once both files are whole.
Nested state (optimizer state dicts, lists of RNG states) is flattened: each tensor is replaced
in the JSON skeleton by {"__tensor__": "<name>"} and stored under that name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from synthbreast.errors import UserError
from synthbreast.fileio import WRITE_ERRORS as WRITE_ERRORS  # re-exported: moved to fileio
from synthbreast.fileio import atomic_write_json, fsync_dir, read_json, sha256_file, temp_name
from synthbreast.fileio import out_of_space_or_unwritable as out_of_space_or_unwritable

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{9})\.json$")
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


def pid_alive(pid: int) -> bool:
    """Is process `pid` running on this machine (as any user)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folders: list[Path]) -> list[Path]:
    """Remove the `.<name>.tmp-<pid>` files (synthbreast.fileio.temp_name) that a killed or
    failed process of this machine left in `folders`; returns them. Only for folders that one
    process writes at a time (a run folder): a live writer's files (pid running) are kept."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in sorted(Path(folder).iterdir()):
            found = _TEMP.match(path.name)
            if found and path.is_file() and not pid_alive(int(found[1])):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace every tensor in a nested structure by a reference; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        name = prefix.strip(".") or "tensor"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint dict keys must be str or int at {prefix!r}")
        # JSON keys are strings: remember which were ints (optimizer state is keyed by int)
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}{k}.")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{prefix}{i}.") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def checkpoint_paths(run_dir: Path, step: int) -> tuple[Path, Path]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    return folder / f"ckpt-{step:09d}.safetensors", folder / f"ckpt-{step:09d}.json"


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], keep: int = 3, protect: int | None = None
) -> Path:
    """Write `state` (nested dicts/lists of tensors and JSON values) as checkpoint `step`.

    Returns the .json path. Keeps the newest `keep` checkpoints (0 keeps all) and the one of
    step `protect` (the best snapshot so far, which `generate` uses by default).
    """
    tensors_path, json_path = checkpoint_paths(run_dir, step)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    tmp = temp_name(tensors_path)
    try:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as err:  # its I/O errors as the OSError they are (disk full)
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(tensors_path)) from err
        tmp.replace(tensors_path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(tensors_path.parent)
    meta = {
        "format": "synthbreast-checkpoint/1",
        "step": step,
        "tensors_file": tensors_path.name,
        "sha256": sha256_file(tensors_path),
        "state": skeleton,
    }
    try:
        atomic_write_json(json_path, meta)
    except OSError:
        # no .json, no checkpoint: leave neither half of this one (nor the temp file) behind
        tensors_path.unlink(missing_ok=True)
        temp_name(json_path).unlink(missing_ok=True)
        raise
    kept = list_checkpoints(run_dir)
    if keep:
        protected = None if protect is None else checkpoint_paths(run_dir, protect)[1].name
        pruned = [old for old in kept[:-keep] if old.name != protected]
        for old in pruned:
            old.unlink(missing_ok=True)
        kept = [p for p in kept if p not in pruned]
    # a kill between the two halves of a save, or of a prune, leaves a .safetensors with no
    # .json: never read (a checkpoint is its .json), removed here by the next save
    named = {p.stem for p in kept}
    for half in tensors_path.parent.glob("ckpt-*.safetensors"):
        if half.stem not in named:
            half.unlink(missing_ok=True)
    return json_path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The .json files of a run's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def resolve_checkpoint(path: Path) -> Path:
    """A run folder (its latest checkpoint), a folder holding one run folder (a train-gan
    --outdir: what a Slurm chain knows before the run is numbered), or one checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / CHECKPOINT_DIR).is_dir():
        runs = sorted(p for p in path.glob("[0-9][0-9][0-9][0-9][0-9]-*") if list_checkpoints(p))
        if len(runs) > 1:
            names = ", ".join(p.name for p in runs)
            raise UserError(f"{path} holds several runs ({names}): give one run folder")
        if runs:
            path = runs[0]
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"{path} has no checkpoints in {path / CHECKPOINT_DIR}")
        return found[-1]
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found (give a run folder or a ckpt-*.json)")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint; returns {"step", "state"}. Never unpickles anything."""
    json_path = resolve_checkpoint(path)
    try:
        meta = read_json(json_path)
        tensors_path = json_path.with_name(meta["tensors_file"])
    except (ValueError, KeyError) as err:
        raise UserError(
            f"checkpoint {json_path} is corrupt ({err}): delete it or resume from an earlier one"
        ) from err
    if not tensors_path.is_file() or sha256_file(tensors_path) != meta["sha256"]:
        raise UserError(
            f"checkpoint {tensors_path} is missing or does not match its checksum in "
            f"{json_path.name}: delete both files to resume from an earlier checkpoint"
        )
    tensors = load_file(str(tensors_path))
    return {"step": meta["step"], "state": unflatten(meta["state"], tensors), "path": json_path}
