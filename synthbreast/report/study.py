"""The report's "Augmentation study" section: each `synthbreast study` folder under RUNS as a
table (mean ± sd per synthetic ratio, or per SinGAN model count, paired differences to
real-only with 95% intervals) and two SVG plots (metric vs ratio or model count with ± sd
bars; difference vs the same with corrected 95% bars). A model-count study plots each class's
AUC beside the mean AUC: the BCDR thesis reads the malignant class's.

The summary is recomputed from the task files (synthbreast.eval.study.summarise), so the
report shows the tasks as they are now, done or not, whatever OUT/summary.json says.
"""

from __future__ import annotations

from typing import Any

from synthbreast.eval.study import (
    METRICS,
    interval_text,
    metric_name,
    per_class_metrics,
    summary_table,
)
from synthbreast.report.collect import Collected, StudyRun
from synthbreast.report.render import (
    DASH,
    Bullets,
    Document,
    Heading,
    Para,
    Row,
    Table,
    shown_path,
    weights_text,
)
from synthbreast.report.svg import PALETTE, Series, line_plot

SECTION = "Augmentation study"
PLOTTED = ("auc", "balanced_accuracy")  # accuracy follows balanced accuracy on balanced folds


def plotted(summary: dict[str, Any]) -> list[str]:
    """The metrics the plots draw: AUC and balanced accuracy; a model-count study, AUC and
    each class's AUC."""
    if summary.get("singan_models"):
        return ["auc", *per_class_metrics(summary)]
    return list(PLOTTED)


def colours(summary: dict[str, Any]) -> dict[str, str]:
    """One colour per plotted metric, the same in both plots."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(plotted(summary))}


def arm_x(summary: dict[str, Any]) -> list[float]:
    """Each row's place on the x axis: its ratio, or its SinGAN model count."""
    if summary.get("singan_models"):
        return [float(r["models"]) for r in summary["rows"]]
    return [float(r["ratio"]) for r in summary["rows"]]


def bars(
    label: str,
    xs: list[float],
    centres: list[float | None],
    lows: list[float | None],
    highs: list[float | None],
    colour: str | None = None,
) -> Series:
    """One polyline through the centres with a vertical bar at each (down to the low end, up to
    the high end and back): error bars with svg.line_plot as it is, one legend entry."""
    x: list[float] = []
    y: list[float] = []
    for xi, centre, low, high in zip(xs, centres, lows, highs, strict=True):
        if centre is None:
            continue
        low = centre if low is None else low
        high = centre if high is None else high
        x += [xi, xi, xi, xi]
        y += [centre, high, low, centre]
    return Series(label, x, y, colour)


def _offsets(ratios: list[float], count: int) -> list[float]:
    """A small x shift per series, so bars at one ratio do not hide each other."""
    span = (max(ratios) - min(ratios)) or 1.0
    return [(i - (count - 1) / 2) * 0.012 * span for i in range(count)]


def metric_plot(summary: dict[str, Any], title: str) -> str:
    rows = summary["rows"]
    ratios = arm_x(summary)
    metrics, colour = plotted(summary), colours(summary)
    series = []
    for shift, metric in zip(_offsets(ratios, len(metrics)), metrics, strict=True):
        entries = [r["metrics"][metric] for r in rows]
        centres = [e["mean"] for e in entries]
        sds = [e["sd"] or 0.0 for e in entries]
        lows = [None if m is None else m - s for m, s in zip(centres, sds, strict=True)]
        highs = [None if m is None else m + s for m, s in zip(centres, sds, strict=True)]
        xs = [r + shift for r in ratios]
        label = f"{metric_name(metric, summary)} (mean ± sd)"
        series.append(bars(label, xs, centres, lows, highs, colour[metric]))
    return line_plot(series, title, _xlabel(summary), "metric on held-out patients")


def difference_plot(summary: dict[str, Any], title: str) -> str:
    rows = summary["rows"]
    ratios = arm_x(summary)
    metrics, colour = plotted(summary), colours(summary)
    series = [Series("no difference", [min(ratios), max(ratios)], [0.0, 0.0], "#999", "4 4")]
    for shift, metric in zip(_offsets(ratios, len(metrics)), metrics, strict=True):
        centres, lows, highs = [], [], []
        for row in rows:
            entry = (row.get("vs_real_only") or {}).get(metric)
            if row["ratio"] == 0:
                entry = {"mean": 0.0}  # the baseline against itself
            interval = (entry or {}).get("ci95_corrected") or [None, None]
            centres.append((entry or {}).get("mean"))
            lows.append(interval[0])
            highs.append(interval[1])
        xs = [r + shift for r in ratios]
        label = f"Δ {metric_name(metric, summary)} (corrected 95%)"
        series.append(bars(label, xs, centres, lows, highs, colour[metric]))
    return line_plot(series, title, _xlabel(summary), "difference to real-only")


def _xlabel(summary: dict[str, Any]) -> str:
    if summary.get("singan_models"):
        return "SinGAN models the added images come from (0 = real only)"
    if summary.get("balance_minority"):
        return "synthetic ratio (x the gap of each minority class to the majority)"
    return "synthetic images per real training image, per class"


def paired_table(summary: dict[str, Any]) -> Table:
    arm = "SinGAN models" if summary.get("singan_models") else "ratio"
    header = [arm, "metric", "Δ mean", "sd", "pairs", "95% t interval", "95% corrected"]
    rows = []
    for row in summary["rows"]:
        for metric in summary.get("metrics", METRICS):
            entry = (row.get("vs_real_only") or {}).get(metric)
            if not entry:
                continue
            rows.append(
                [
                    row.get("arm") or f"{row['ratio']:g}",
                    metric_name(metric, summary),
                    interval_text(entry, key=""),
                    DASH if entry.get("sd") is None else f"{entry['sd']:.3f}",
                    str(entry.get("n", 0)),
                    interval_text(entry),
                    interval_text(entry, "ci95_corrected"),
                ]
            )
    return Table(header, rows, caption="Paired differences to real-only (same fold and seed)")


def study_section(doc: Document, collected: Collected) -> None:
    doc.add(Heading(2, SECTION))
    if not collected.studies:
        doc.add(Para("No augmentation study under RUNS (`synthbreast study`)."))
        return
    for number, study in enumerate(collected.studies):
        _one_study(doc, collected, number, study)


def _one_study(doc: Document, collected: Collected, number: int, study: StudyRun) -> None:
    where = shown_path(study.folder, collected.runs)
    doc.add(Heading(3, f"Study `{where}`"))
    summary = study.summary
    if summary is None:
        doc.add(Para(f"The study cannot be read: {study.error}", warn=True))
        return
    config, tasks = summary.get("config") or {}, summary["tasks"]
    protocol = (
        "synthetic images for the minority classes only, ratio x the gap to the majority"
        if summary.get("balance_minority")
        else "per class, round(ratio x its real training images) synthetic images"
    )
    models = [k for k in summary.get("singan_models") or [] if k]
    if models:
        ratio = max(summary.get("ratios") or [0])
        protocol = (
            f"{protocol} (ratio {ratio:g}), the same number in every arm, drawn from the first "
            f"{', '.join(map(str, models))} SinGAN models of the selection, each model an "
            "equal share"
        )
    baseline = "0 models" if models else "ratio 0"
    kind = "SinGAN model count" if models else "synthetic ratio"
    doc.add(
        Para(
            f"Patient-level stratified {summary['folds']}-fold cross-validation over "
            f"{summary['patients']} real patients (the ingest's train and test pools; never the "
            f"gan pool), seeds {', '.join(map(str, summary['seeds']))}: real-only ({baseline}) "
            f"against real plus, {protocol}. Classifier: {config.get('backbone', DASH)}, "
            f"{weights_text(config.get('weights'))}, {config.get('mode', DASH)}, input "
            f"{config.get('input_size', DASH)}, {config.get('epochs', DASH)} epochs. Tasks: "
            f"{tasks['done']} of {tasks['expected']} done."
        )
    )
    header, rows = summary_table(summary)
    doc.add(Table(header, rows, caption=f"Mean ± sd over folds and seeds, per {kind}"))
    doc.add(paired_table(summary))
    name = f"study-{number}"
    doc.add(
        Row(
            [
                doc.figure(
                    f"{name}-metrics.svg",
                    f"Metric vs {kind} (bars: ± 1 sd over folds and seeds)",
                    svg=metric_plot(summary, f"Held-out patients vs {kind}"),
                ),
                doc.figure(
                    f"{name}-difference.svg",
                    "Paired difference to real-only (bars: Nadeau-Bengio corrected 95%)",
                    svg=difference_plot(summary, "Difference to real-only"),
                ),
            ]
        )
    )
    doc.add(
        Para(
            "Intervals: the t interval treats the (fold, seed) pairs as independent; they are "
            "not (folds share training patients, seeds share patients), so it is too narrow. "
            "The corrected interval (Nadeau & Bengio 2003; Bouckaert & Frank 2004) widens the "
            "variance to (1/n + n_test/n_train) sd²; read that one. An interval that holds 0 "
            "shows no effect of the synthetic images at this sample size."
        )
    )
    left = [f"{task}: {error}" for task, error in tasks["failed"].items()]
    left += [f"{task}: missing" for task in tasks["missing"]]
    if left:
        doc.add(Para(f"{len(left)} of {tasks['expected']} tasks have no result:", warn=True))
        doc.add(Bullets(left[:20] + ([f"... {len(left) - 20} more"] if len(left) > 20 else [])))
