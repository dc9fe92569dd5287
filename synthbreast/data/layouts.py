"""Source folder layouts, registered by name: each turns a folder into image records and problems.

A layout only reads names and folders; decoding and checking the pixels is ingest's job.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

# The Kaggle IDC file name: <patient>_idx5_x<X>_y<Y>_class<C>.png
IDC_NAME = re.compile(
    r"^(?P<patient>[^_/]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$"
)


@dataclass(frozen=True)
class Record:
    """One image found in the source folder, before its pixels are checked."""

    path: str  # relative to the source folder, with '/' separators
    patient: str
    label: int
    x: int | None = None
    y: int | None = None


@dataclass(frozen=True)
class Problem:
    """A file that cannot be used as it is. `reason` is a short stable word counted in manifests."""

    path: str
    reason: str
    detail: str


@dataclass
class Scan:
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # not images (e.g. .DS_Store, notes)
    class_names: list[str] = field(default_factory=list)
    patient_level: bool = True  # False when every image is its own "patient"


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    default_patch_size: int | None
    scan: Callable[..., Scan]


def _walk(root: Path) -> list[str]:
    """Every file under root, relative, sorted, '/'-separated (sorted so that scans are stable)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return found


def _is_image(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def scan_idc(root: Path, patient_regex: str | None = None) -> Scan:
    """`<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png`, the Kaggle IDC layout."""
    if patient_regex:
        raise ValueError("--patient-regex applies to the imagefolder format only")
    scan = Scan(class_names=["0", "1"])
    for rel in _walk(root):
        if not _is_image(rel):
            scan.ignored.append(rel)
            continue
        parts = rel.split("/")
        if len(parts) != 3 or parts[1] not in ("0", "1"):
            scan.problems.append(
                Problem(rel, "bad_path", "expected <patient>/<0|1>/<file>.png at depth 2")
            )
            continue
        patient, folder, name = parts
        match = IDC_NAME.match(name)
        if not match:
            scan.problems.append(
                Problem(rel, "bad_name", "expected <patient>_idx5_x<X>_y<Y>_class<0|1>.png")
            )
            continue
        if match["patient"] != patient:
            scan.problems.append(
                Problem(rel, "patient_mismatch", f"file names patient {match['patient']}")
            )
            continue
        if match["label"] != folder:
            scan.problems.append(
                Problem(
                    rel,
                    "label_mismatch",
                    f"folder says class {folder}, file name says class {match['label']}",
                )
            )
            continue
        scan.records.append(Record(rel, patient, int(folder), int(match["x"]), int(match["y"])))
    return scan


def scan_imagefolder(root: Path, patient_regex: str | None = None) -> Scan:
    """`<class>/<files>` (torchvision ImageFolder); patients from a regex on the file name.

    The regex must have a named group `patient`; without it every image is its own patient
    and the manifest records that the split is not patient-level.
    """
    pattern = re.compile(patient_regex) if patient_regex else None
    if pattern is not None and "patient" not in pattern.groupindex:
        raise ValueError("--patient-regex needs a named group, e.g. '^(?P<patient>[^_]+)_'")
    files = _walk(root)
    class_names = sorted({rel.split("/")[0] for rel in files if "/" in rel and _is_image(rel)})
    scan = Scan(class_names=class_names, patient_level=pattern is not None)
    index = {name: i for i, name in enumerate(class_names)}
    for rel in files:
        if not _is_image(rel):
            scan.ignored.append(rel)
            continue
        parts = rel.split("/")
        if len(parts) != 2:
            scan.problems.append(Problem(rel, "bad_path", "expected <class>/<file> at depth 1"))
            continue
        if pattern is None:
            patient = rel
        else:
            match = pattern.search(parts[1])
            if not match:
                scan.problems.append(
                    Problem(rel, "bad_name", f"--patient-regex {pattern.pattern!r} does not match")
                )
                continue
            patient = match["patient"]
        scan.records.append(Record(rel, patient, index[parts[0]]))
    return scan


LAYOUTS: dict[str, Layout] = {
    "idc": Layout(
        "idc",
        "Kaggle IDC: <patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png, 50x50 RGB",
        50,
        scan_idc,
    ),
    "imagefolder": Layout(
        "imagefolder",
        "<class>/<files>, classes sorted by folder name; patients from --patient-regex",
        None,
        scan_imagefolder,
    ),
}
