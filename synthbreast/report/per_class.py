"""The report's per-class section: for tasks of more than two classes (healthy / benign /
malignant), each class's one-vs-rest AUC with its patient-bootstrap interval, precision,
recall and F1 per scenario, the macro averages, one ROC figure per class; and, for grey data,
how the classifier took its one channel. Reads only the runs' metrics.json (`per_class`,
`macro`, `ci95`, `model.grey_input`), written by eval/metrics.multiclass_metrics and classify.
"""

from __future__ import annotations

from typing import Any

from synthbreast.report.collect import OK, Collected
from synthbreast.report.render import Document, Heading, Para, Table, num, warn, with_ci
from synthbreast.report.svg import Series, line_plot


def _multiclass_runs(collected: Collected) -> list[tuple[str, dict[str, Any]]]:
    return [
        (run.name, run.metrics)
        for run in collected.scenarios
        if run.status == OK and isinstance((run.metrics or {}).get("per_class"), list)
    ]


def grey_input_note(doc: Document, collected: Collected) -> None:
    """One line saying how grey images entered the classifiers (replicated, or 1 channel)."""
    ways = set()
    for run in collected.scenarios:
        model = (run.metrics or {}).get("model") or {}
        if model.get("data_channels") == 1:
            ways.add(
                model.get("grey_input") or f"grey read as {model.get('input_channels')} channel"
            )
    if ways:
        doc.add(Para(f"Grey (1-channel) images; classifier input: {'; '.join(sorted(ways))}."))


def per_class_section(
    doc: Document, collected: Collected, banners: list[str] | None = None
) -> None:
    runs = _multiclass_runs(collected)
    if not runs:
        return
    doc.add(Heading(2, "Per class (one-vs-rest)"))
    warn(doc, banners)
    header = ["scenario", "class", "test images", "AUC [95% CI]", "precision", "recall", "F1"]
    rows = []
    for name, metrics in runs:
        for row in metrics["per_class"]:
            rows.append(
                [
                    name,
                    str(row.get("name", row.get("class"))),
                    str(row.get("support", "")),
                    with_ci(row.get("roc_auc"), row.get("roc_auc_ci95")),
                    num(row.get("precision")),
                    num(row.get("recall")),
                    num(row.get("f1")),
                ]
            )
        macro = metrics.get("macro") or {}
        ci = (metrics.get("ci95") or {}).get("roc_auc")
        rows.append(
            [
                name,
                "macro",
                "",
                with_ci(macro.get("roc_auc"), ci),
                num(macro.get("precision")),
                num(macro.get("recall")),
                num(macro.get("f1")),
            ]
        )
    method = (runs[0][1].get("ci95") or {}).get("method", "bootstrap")
    doc.add(
        Para(
            f"AUC of each class against the others, intervals by {method} (none where the "
            "test set lacks the class); macro: the mean over the classes the test set holds."
        )
    )
    doc.add(Table(header, rows))
    names = [str(row.get("name", row.get("class"))) for row in runs[0][1]["per_class"]]
    for c, class_name in enumerate(names):
        series = []
        for name, metrics in runs:
            if c >= len(metrics["per_class"]):
                continue
            row = metrics["per_class"][c]
            roc = row.get("roc") or {}
            if roc.get("fpr") and roc.get("tpr"):
                series.append(
                    Series(f"{name} (AUC {num(row.get('roc_auc'))})", roc["fpr"], roc["tpr"])
                )
        if not series:
            continue
        svg = line_plot(
            series,
            f"ROC, class {class_name} vs the rest",
            "false positive rate",
            "true positive rate",
            xlim=(0.0, 1.0),
            ylim=(0.0, 1.0),
            diagonal=True,
        )
        doc.add(
            doc.figure(
                f"roc-{class_name}.svg", f"ROC of class {class_name}; dashed: chance", svg=svg
            )
        )
