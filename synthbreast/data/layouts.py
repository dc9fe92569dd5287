"""Source folder layouts, registered by name: each turns a folder into image records and problems.

A layout only reads names and folders; decoding and checking the pixels is ingest's job.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from synthbreast.data.mammo import BWC, HEALTHY, PATHOLOGY_WORDS, Lesion

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
    lesions: tuple[Lesion, ...] = ()  # mammograms: the annotated abnormalities of the image
    view: str = ""  # mammograms: MLO | CC | "" (unknown); MLO films show the pectoral muscle


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
    # Mammograms: records are whole images with lesions, cut into patches by ingest.
    mammograms: bool = False
    annotations: dict[str, str] = field(default_factory=dict)  # tables read: name -> sha256
    absent: list[str] = field(default_factory=list)  # images the table names that are not here


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    default_patch_size: int | None
    scan: Callable[..., Scan]
    # SRC -> the folder under it to scan, when SRC wraps the data in one more folder
    data_root: Callable[[Path], str | None] | None = None
    channels: int | None = None  # None: from the data (1 when every image is grey)
    labels: str | None = None  # mammograms: the default label map (mammo.LABEL_MAPS)
    options: tuple[str, ...] = ()  # IngestConfig fields the scan takes as keywords


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


# --- mammograms ------------------------------------------------------------------------

MIAS_TABLE = "Info.txt"
MIAS_NAME = re.compile(r"^mdb(?P<number>\d{3})\.(pgm|png)$", re.IGNORECASE)
MIAS_REF = re.compile(r"^mdb\d{3}$")
MIAS_TISSUE = {"F", "G", "D"}  # fatty, fatty-glandular, dense-glandular
MIAS_CLASSES = {"CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM"}
MIAS_SEVERITY = {"B": "benign", "M": "malignant"}


def mias_patient(number: int) -> str:
    """The woman: mini-MIAS numbers her left and right films as a pair, 001/002, 003/004 ..."""
    first = number if number % 2 else number - 1
    return f"mdb{first:03d}-{first + 1:03d}"


def parse_mias_table(text: str) -> tuple[dict[str, list[Lesion]], set[str], list[Problem]]:
    """Info.txt -> (lesions by ref, refs of normal images, bad rows).

    A row: ref, background tissue, class, then for an abnormality its severity and, when the
    lesion has a place, x y radius (y from the bottom). Rows without coordinates (diffuse
    lesions, '*NOTE 3*') are lesions without a place; a bad row makes its image's lesions
    unknown (a placeless lesion), so no healthy patch is cut from that image.
    """
    lesions: dict[str, list[Lesion]] = {}
    normal: set[str] = set()
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        where = f"{MIAS_TABLE}:{number}"

        def bad(detail: str, words=words, where=where) -> None:
            problems.append(Problem(where, "bad_row", f"{' '.join(words)!r}: {detail}"))
            if MIAS_REF.match(words[0]):
                lesions.setdefault(words[0], []).append(Lesion("unknown", ref=where))

        ref = words[0]
        if not MIAS_REF.match(ref):
            bad("expected mdbNNN first")
            continue
        if len(words) < 3 or words[1] not in MIAS_TISSUE or words[2] not in MIAS_CLASSES:
            bad("expected ref, tissue F/G/D, class CALC/CIRC/SPIC/MISC/ARCH/ASYM/NORM")
            continue
        if words[2] == "NORM":
            if len(words) != 3:
                bad("a NORM row has nothing after the class")
                continue
            normal.add(ref)
            continue
        if len(words) < 4 or words[3] not in MIAS_SEVERITY:
            bad("an abnormality needs severity B or M")
            continue
        pathology, rest = MIAS_SEVERITY[words[3]], words[4:]
        if not rest or rest[0].startswith("*NOTE"):
            lesions.setdefault(ref, []).append(Lesion(pathology, kind=words[2], ref=where))
            continue
        if len(rest) != 3 or not all(w.isdigit() for w in rest):
            bad("expected x y radius as whole numbers after the severity")
            continue
        x, y, radius = (int(w) for w in rest)
        lesions.setdefault(ref, []).append(
            Lesion(pathology, x, y, radius, kind=words[2], ref=where, y_from_bottom=True)
        )
    return lesions, normal, problems


def scan_mias(root: Path, patient_regex: str | None = None) -> Scan:
    """mini-MIAS: `mdbNNN.pgm` beside `Info.txt`, one row per abnormality (or NORM)."""
    if patient_regex:
        raise ValueError("--patient-regex applies to the imagefolder format only")
    table = root / MIAS_TABLE
    if not table.is_file():
        raise ValueError(
            f"{table} not found: the mias layout reads mdbNNN.pgm beside the set's {MIAS_TABLE} "
            "(ref, tissue, class, severity, x, y, radius); point SRC at the folder holding both"
        )
    try:
        data = table.read_bytes()
    except OSError as err:
        raise ValueError(f"{table} cannot be read ({err.strerror})") from err
    lesions, normal, bad_rows = parse_mias_table(data.decode("ascii", errors="replace"))
    walked = walk(root)
    digest = {MIAS_TABLE: hashlib.sha256(data).hexdigest()}
    scan = _new_scan(walked, mammograms=True, annotations=digest)
    scan.problems += bad_rows
    present = set()
    for rel in walked.files:
        match = MIAS_NAME.match(rel)
        if rel == MIAS_TABLE:
            continue
        if not (match or _is_image(rel)):
            scan.ignored.append(rel)
            continue
        if not match:
            scan.problems.append(Problem(rel, "bad_name", "expected mdbNNN.pgm in SRC itself"))
            continue
        ref = rel[:6].lower()
        if ref not in lesions and ref not in normal:
            detail = f"no row of {MIAS_TABLE} names {ref}"
            scan.problems.append(Problem(rel, "not_in_table", detail))
            continue
        present.add(ref)
        patient = mias_patient(int(match["number"]))
        found = tuple(lesions.get(ref, ()))
        scan.records.append(Record(rel, patient, 0, lesions=found, view="MLO"))  # every MIAS film
    # The table covers the whole set; a sample holds some of it: absent images are counted.
    scan.absent = sorted((set(lesions) | normal) - present)
    return scan


CSV_REQUIRED = ("path", "label", "patient")
CSV_CIRCLE = ("x", "y", "radius")
CSV_BOX = ("x_min", "y_min", "x_max", "y_max")


def _find_table(root: Path, table: str | None) -> Path:
    if table:
        path = Path(table) if Path(table).is_absolute() else root / table
        if not path.is_file():
            raise ValueError(f"--table {table}: {path} not found")
        return path
    found = sorted(p for p in root.glob("*.csv") if p.is_file())
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ValueError(
            f"the csv layout reads one table in {root} (found {len(found)}: {names}): "
            "name it with --table FILE"
        )
    return found[0]


def _number(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    return float(text)  # ValueError: a bad row


def scan_csv(root: Path, patient_regex: str | None = None, table: str | None = None) -> Scan:
    """A table of images: path (relative to SRC), label, patient, and optionally a lesion's
    x y radius or x_min y_min x_max y_max (pixels from the top-left) and the view (MLO or CC:
    MLO films have their pectoral muscle kept out of healthy crops). Several rows may name one
    image (several lesions). With coordinates in any row, images are mammograms cut into
    patches; labels are then normal/healthy, benign, benign_without_callback or malignant (or
    N/B/M), and a normal row has no coordinates. Without coordinates anywhere, each row is an
    image stored as it is, classes named by the label column (sorted).
    """
    if patient_regex:
        raise ValueError("--patient-regex applies to the imagefolder format only")
    path = _find_table(root, table)
    name = path.name if path.parent == root else str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            rows = [
                {k.strip().lower(): (v or "").strip() for k, v in r.items() if k is not None}
                for r in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} cannot be read as CSV ({err})") from err
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise ValueError(
            f"{path} has no column {', '.join(missing)} (columns: {', '.join(header) or 'none'}); "
            f"the csv layout needs {', '.join(CSV_REQUIRED)} and optionally "
            f"{' '.join(CSV_CIRCLE)} or {' '.join(CSV_BOX)}"
        )
    walked = walk(root)
    files = set(walked.files)
    geometry = any(any(row.get(c) for c in (*CSV_CIRCLE, *CSV_BOX)) for row in rows)
    digest = {name: hashlib.sha256(path.read_bytes()).hexdigest()}
    scan = _new_scan(walked, mammograms=geometry, annotations=digest)
    images: dict[str, dict] = {}  # path -> {patient, lesions, normal, label}
    for number, row in enumerate(rows, 2):  # line 1 is the header
        where = f"{name}:{number}"
        rel = row["path"].replace("\\", "/").lstrip("./") if row["path"] else ""
        if not rel or not row["label"] or not row["patient"]:
            scan.problems.append(Problem(where, "bad_row", "path, label and patient are required"))
            continue
        if rel not in files:
            scan.problems.append(Problem(where, "missing_file", f"{rel} not found under {root}"))
            continue
        first = {"patient": row["patient"], "lesions": [], "normal": False, "label": row["label"]}
        first["view"] = row.get("view", "").upper()  # optional: MLO | CC
        image = images.setdefault(rel, first)
        if image["patient"] != row["patient"]:
            detail = f"{rel} is patient {image['patient']!r} in an earlier row"
            scan.problems.append(Problem(where, "patient_mismatch", detail))
            continue
        if not geometry:
            if row["label"] != image["label"]:
                detail = f"{rel} is labelled {image['label']!r} in an earlier row"
                scan.problems.append(Problem(where, "label_mismatch", detail))
            continue
        pathology = PATHOLOGY_WORDS.get(row["label"].lower().replace(" ", "_"))
        if pathology is None:
            words = "normal, benign, benign_without_callback or malignant"
            detail = f"label {row['label']!r}: use {words}"
            scan.problems.append(Problem(where, "bad_label", detail))
            image["lesions"].append(Lesion("unknown", ref=where))
            continue
        try:
            circle = [_number(row.get(c, "")) for c in CSV_CIRCLE]
            box = [_number(row.get(c, "")) for c in CSV_BOX]
        except ValueError:
            scan.problems.append(Problem(where, "bad_row", "coordinates must be numbers"))
            image["lesions"].append(Lesion("unknown", ref=where))
            continue
        has_circle, has_box = None not in circle, None not in box
        partial = any(v is not None for v in circle + box) and not (has_circle or has_box)
        if partial or (pathology == HEALTHY and (has_circle or has_box)):
            detail = (
                "a normal row has no coordinates"
                if pathology == HEALTHY
                else f"give all of {' '.join(CSV_CIRCLE)} or all of {' '.join(CSV_BOX)}"
            )
            scan.problems.append(Problem(where, "bad_row", detail))
            image["lesions"].append(Lesion("unknown", ref=where))
            continue
        if pathology == HEALTHY:
            image["normal"] = True
        elif has_box:
            x0, y0, x1, y1 = (round(v) for v in box)
            image["lesions"].append(Lesion(pathology, bbox=(x0, y0, x1, y1), ref=where))
        elif has_circle:
            x, y, radius = circle
            image["lesions"].append(Lesion(pathology, x, y, radius, ref=where))
        else:
            image["lesions"].append(Lesion(pathology, ref=where))  # a lesion with no place
    if geometry:
        for rel, image in images.items():
            lesions = tuple(image["lesions"])
            scan.records.append(
                Record(rel, image["patient"], 0, lesions=lesions, view=image["view"])
            )
    else:
        scan.class_names = sorted({image["label"] for image in images.values()})
        index = {label: i for i, label in enumerate(scan.class_names)}
        for rel, image in images.items():
            scan.records.append(Record(rel, image["patient"], index[image["label"]]))
    listed = set(images) | {p.path for p in scan.problems}
    scan.ignored += [rel for rel in walked.files if rel not in listed and rel != name]
    return scan


CBIS_TABLE = re.compile(r"(mass|calc)_case_description_(train|test)_set\.csv$", re.IGNORECASE)
CBIS_PATHOLOGY = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": BWC}
CBIS_COLUMNS = ("patient_id", "pathology", "image file path", "roi mask file path")


class CbisResolver:
    """A description CSV's DICOM path -> the file in SRC. Tried in order: the path itself
    (under SRC or SRC/CBIS-DDSM); the Kaggle JPEG export, `jpeg/<SeriesInstanceUID>/*.jpg`,
    the series being the path's third part (the lab's dictionaries did this by hand); a DICOM
    of that SeriesInstanceUID anywhere under SRC (the new TCIA download's folder names)."""

    def __init__(self, root: Path, files: list[str]):
        self.root = root
        self.files = set(files)
        self.by_folder: dict[str, list[str]] = {}
        for rel in files:
            if "/" in rel and Path(rel).suffix.lower() in {".jpg", ".jpeg", ".png"}:
                self.by_folder.setdefault(rel.split("/")[-2], []).append(rel)
        self.dicoms = [rel for rel in files if Path(rel).suffix.lower() in {".dcm", ".dicom"}]
        self._series: dict[str, list[str]] | None = None

    def series_index(self) -> dict[str, list[str]]:
        if self._series is None:
            import pydicom

            self._series = {}
            for rel in self.dicoms:
                try:
                    header = pydicom.dcmread(self.root / rel, stop_before_pixels=True)
                    uid = str(header.SeriesInstanceUID)
                except Exception:  # not DICOM, or no series: not a candidate
                    continue
                self._series.setdefault(uid, []).append(rel)
        return self._series

    def resolve(self, text: str, whole_series: bool) -> list[str]:
        """The files a CSV path stands for: one image, or for a ROI path every file of its
        series (mask and crop, told apart later by size). Empty: not found."""
        path = text.strip().strip('"').replace("\\", "/")  # the CSVs end some paths in "\n"
        parts = path.split("/")
        for prefix in ("", "CBIS-DDSM/"):
            if prefix + path in self.files:
                if not whole_series:
                    return [prefix + path]
                folder = (prefix + path).rsplit("/", 1)[0]
                return sorted(f for f in self.files if f.rsplit("/", 1)[0] == folder)
        series = parts[-2] if len(parts) >= 2 else ""
        if series in self.by_folder:
            return sorted(self.by_folder[series])
        if self.dicoms:
            try:
                return sorted(self.series_index().get(series, []))
            except ImportError:
                return []
        return []


def scan_cbis_ddsm(root: Path, patient_regex: str | None = None) -> Scan:
    """CBIS-DDSM: the published description CSVs (anywhere under SRC) with the images as the
    DICOM download or as Kaggle's JPEG export. One record per full mammogram, its rows as
    lesions located by their ROI masks; patient = patient_id (all her films and views)."""
    if patient_regex:
        raise ValueError("--patient-regex applies to the imagefolder format only")
    walked = walk(root)
    tables = [rel for rel in walked.files if CBIS_TABLE.search(rel.rsplit("/", 1)[-1])]
    if not tables:
        raise ValueError(
            f"no CBIS-DDSM description CSV under {root} (mass_case_description_train_set.csv, "
            "calc_case_description_test_set.csv, ...): point SRC at the folder holding them"
        )
    resolver = CbisResolver(root, walked.files)
    scan = _new_scan(walked, mammograms=True)
    images: dict[str, dict] = {}
    for table in tables:
        data = (root / table).read_bytes()
        scan.annotations[table] = hashlib.sha256(data).hexdigest()
        reader = csv.DictReader(data.decode("utf-8-sig", errors="replace").splitlines())
        header = [h.strip().lower() for h in reader.fieldnames or []]
        missing = [c for c in CBIS_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{root / table} has no column {', '.join(missing)}: not a CBIS-DDSM "
                "description CSV"
            )
        for number, raw in enumerate(reader, 2):
            row = {k.strip().lower(): (v or "") for k, v in raw.items() if k is not None}
            where = f"{table}:{number}"
            pathology = CBIS_PATHOLOGY.get(row["pathology"].strip().upper())
            if pathology is None:
                detail = f"pathology {row['pathology']!r}: expected {', '.join(CBIS_PATHOLOGY)}"
                scan.problems.append(Problem(where, "bad_row", detail))
                continue
            full = resolver.resolve(row["image file path"], whole_series=False)
            if len(full) != 1:
                what = "not found" if not full else f"{len(full)} candidates"
                detail = f"full image {row['image file path'].strip()} {what} (DICOM or jpeg/)"
                scan.problems.append(Problem(where, "missing_file", detail))
                continue
            masks = resolver.resolve(row["roi mask file path"], whole_series=True)
            if not masks:
                detail = f"ROI mask {row['roi mask file path'].strip()} not found"
                scan.problems.append(Problem(where, "missing_file", detail))
                continue
            kind = row.get("abnormality type", "").strip()
            view = row.get("image view", "").strip().upper()
            image = images.setdefault(
                full[0], {"patient": row["patient_id"].strip(), "l": [], "view": view}
            )
            image["l"].append(Lesion(pathology, kind=kind, ref=where, masks=tuple(masks)))
    for rel, image in sorted(images.items()):
        lesions = tuple(image["l"])
        scan.records.append(Record(rel, image["patient"], 0, lesions=lesions, view=image["view"]))
    used = set(images) | {m for im in images.values() for les in im["l"] for m in les.masks}
    scan.ignored += [rel for rel in walked.files if rel not in used and rel not in tables]
    return scan


LAYOUTS: dict[str, Layout] = {
    "idc": Layout(
        "idc",
        "Kaggle IDC: <patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png, 50x50 RGB",
        50,
        scan_idc,
        idc_data_root,
        channels=3,
    ),
    "imagefolder": Layout(
        "imagefolder",
        "<class>/<files>, classes sorted by folder name; patients from --patient-regex",
        None,
        scan_imagefolder,
    ),
    "mias": Layout(
        "mias",
        "mini-MIAS: mdbNNN.pgm beside Info.txt (lesion centre and radius, y from the bottom); "
        "cut into lesion and healthy patches",
        224,
        scan_mias,
        channels=1,
        labels="healthy-benign-malignant",
    ),
    "csv": Layout(
        "csv",
        "a table (--table, or the one .csv in SRC): path, label, patient, optional x y radius "
        "or x_min y_min x_max y_max; with coordinates, cut into patches",
        None,  # images as they are without coordinates; cut patches default to 224
        scan_csv,
        labels="healthy-benign-malignant",
        options=("table",),
    ),
    "cbis-ddsm": Layout(
        "cbis-ddsm",
        "CBIS-DDSM: *_case_description_*_set.csv with the DICOM download or Kaggle's jpeg/ "
        "export (DICOM needs the dicom extra); lesions located by their ROI masks",
        224,
        scan_cbis_ddsm,
        channels=1,
        labels="benign-malignant",
    ),
}
