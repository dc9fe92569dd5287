"""Source folder layouts, registered by name: each turns a folder into image records and problems.

A layout only reads names and folders; decoding and checking the pixels is ingest's job.
"""

from __future__ import annotations

import errno
import os
import re
import stat
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
    links: dict = field(default_factory=dict)  # Walk.link_record(): what symlinks were followed
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of every file found, by path


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    default_patch_size: int | None
    scan: Callable[..., Scan]
    # SRC -> the folder under it to scan, when SRC wraps the data in one more folder
    data_root: Callable[[Path], str | None] | None = None


@dataclass
class Walk:
    """Every file under a root, symlinks followed, each real file once.

    `files` are relative, '/'-separated, in os.walk's top-down order with names sorted (the
    order the records, and so the shards, have always had). A file reached twice (a second
    link to a folder) is kept once, under the path without links where there is one.
    """

    files: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)  # dangling links, loops, unreadable
    followed_dirs: list[dict[str, str]] = field(default_factory=list)
    followed_files: int = 0
    duplicates: list[dict[str, str]] = field(default_factory=list)

    def link_record(self) -> dict:
        return {
            "followed_dirs": self.followed_dirs,
            "followed_files": self.followed_files,
            "duplicates": self.duplicates,
        }


def walk(root: Path) -> Walk:
    """Walk root following symlinked folders and files (how subsets are assembled on clusters).

    A link that leads nowhere is a `dangling_link` problem, one that leads back to a folder it
    is inside of (or to itself) a `symlink_loop`; both are named, never walked.
    """
    result = Walk()
    found: list[tuple[str, str, bool]] = []  # (path, real path, reached without a link)

    def visit(folder: str, rel_folder: str, chain: tuple[str, ...], direct: bool) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            result.problems.append(Problem(rel_folder or ".", "unreadable", err.strerror or ""))
            return
        files, folders = [], []
        for entry in entries:
            (folders if _is_dir(entry) else files).append(entry)
        for entry in sorted(files, key=lambda e: e.name):
            rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            if entry.is_symlink():
                problem = _broken_link(entry.path, rel)
                if problem:
                    result.problems.append(problem)
                    continue
                result.followed_files += 1
                found.append((rel, os.path.realpath(entry.path), False))
            else:
                found.append((rel, os.path.join(chain[-1], entry.name), direct))
            try:
                result.sizes[rel] = entry.stat().st_size
            except OSError:
                result.sizes[rel] = -1
        for entry in sorted(folders, key=lambda e: e.name):
            rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if any(os.path.commonpath([target, c]) == target for c in chain):
                    detail = f"link to {target}, a folder it is inside of"
                    result.problems.append(Problem(rel, "symlink_loop", detail))
                    continue
                result.followed_dirs.append({"path": rel, "target": target})
                visit(entry.path, rel, (*chain, target), False)
            else:
                visit(entry.path, rel, (*chain, os.path.join(chain[-1], entry.name)), direct)

    visit(str(root), "", (os.path.realpath(root),), True)
    chosen: dict[str, tuple[str, bool]] = {}
    for rel, real, direct in found:
        if real not in chosen or (direct and not chosen[real][1]):
            chosen[real] = (rel, direct)
    for rel, real, _ in found:
        if chosen[real][0] == rel:
            result.files.append(rel)
        else:
            result.duplicates.append({"path": rel, "same_file_as": chosen[real][0]})
            del result.sizes[rel]
    return result


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk does
    except OSError:
        return False


def _broken_link(path: str, rel: str) -> Problem | None:
    """Why the link at `path` cannot be followed, or None when it leads to a file or folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        target = os.readlink(path)
        if err.errno == errno.ELOOP:
            return Problem(rel, "symlink_loop", f"link to {target}, which leads back to itself")
        return Problem(rel, "dangling_link", f"link to {target}, which does not exist")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return Problem(rel, "not_a_file", f"link to {os.readlink(path)}, not a file")
    return None


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


def _new_scan(walked: Walk, **fields) -> Scan:
    return Scan(
        problems=list(walked.problems), links=walked.link_record(), sizes=walked.sizes, **fields
    )


def _visible_folders(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if not e.name.startswith(".") and _is_dir(e)]


def _is_idc_patient(folder: Path) -> bool:
    return (folder / "0").is_dir() or (folder / "1").is_dir()


def idc_data_root(root: Path) -> str | None:
    """The Kaggle download's own folder (`IDC_regular_ps50_idx5/<patient>/...`) when SRC is one
    level above the patient folders and it is the only such folder; None when SRC holds the
    patient folders (or nothing like them: the scan says what it found). Ambiguous: ValueError.
    """
    folders = _visible_folders(root)
    wrappers = [f for f in folders if any(_is_idc_patient(g) for g in _visible_folders(f))]
    if not wrappers:
        return None
    if any(_is_idc_patient(f) for f in folders):
        raise ValueError(
            f"{root} holds patient folders and also {wrappers[0].name}/ with patient folders "
            f"inside (the Kaggle archive has both copies): point SRC at {wrappers[0]}"
        )
    if len(wrappers) > 1:
        names = ", ".join(str(w) for w in wrappers)
        raise ValueError(
            f"{root} holds no patient folders but {len(wrappers)} folders of them ({names}): "
            "point SRC at the one to ingest"
        )
    return wrappers[0].name


def scan_idc(root: Path, patient_regex: str | None = None) -> Scan:
    """`<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png`, the Kaggle IDC layout."""
    if patient_regex:
        raise ValueError("--patient-regex applies to the imagefolder format only")
    walked = walk(root)
    scan = _new_scan(walked, class_names=["0", "1"])
    for rel in walked.files:
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
    walked = walk(root)
    files = walked.files
    class_names = sorted({rel.split("/")[0] for rel in files if "/" in rel and _is_image(rel)})
    scan = _new_scan(walked, class_names=class_names, patient_level=pattern is not None)
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
        idc_data_root,
    ),
    "imagefolder": Layout(
        "imagefolder",
        "<class>/<files>, classes sorted by folder name; patients from --patient-regex",
        None,
        scan_imagefolder,
    ),
}
