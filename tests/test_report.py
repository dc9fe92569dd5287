"""`synthbreast report` on a RUNS folder written by hand: the report reads only files, so the
files of three successful scenarios, one failed and one missing, a GAN run, real demo shards
and a synthetic shard are all it needs. Its banners (a collapsed generator, a domain gap) come
from the same kind of files: a synthetic manifest's `quality`, the scenarios' metrics.json."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import GenerateConfig, TrainGANConfig, to_dict
from synthbreast.data.shards import Sample, save_manifest, write_shard
from synthbreast.eval.quality import REMEDY
from synthbreast.fileio import atomic_write_json, sha256_file
from synthbreast.generate import new_manifest, shard_name
from synthbreast.report.collect import METRIC_FILE
from synthbreast.report.render import DASH, NOT_COMPARABLE, SECTIONS
from synthbreast.report.svg import Series, line_plot, nice_ticks
from synthbreast.results import FIDELITY_SCHEMA

OK_SCENARIOS = {"real-real": 0.7, "synth-synth": 0.95, "real-synth": 0.6}
FAILED_SCENARIO, MISSING_SCENARIO = "synth-real", "real+synth-real"
ERROR = "RuntimeError: out of memory in the test"
GAN_RUN = "00000-msggan-gan-class1-32px"
# generate's collapse check (the manifest's `quality`) of a fine set and of a collapsed one
HEALTHY = {
    "checked": True,
    "features": "texture",
    "images": 500,
    "kid": 12.3,
    "precision": 0.8,
    "recall": 0.4,
    "coverage": 0.5,
    "diversity": 0.9,
    "classes": {"1": {"kid": 12.3, "recall": 0.4, "diversity": 0.9}},
    "collapsed": {},
}
REASONS = [
    "diversity 0.01 of the real images' (collapse below 0.25)",
    "recall 0.00 (collapse below 0.05)",
]
COLLAPSED = {
    **HEALTHY,
    "kid": 57.3,
    "recall": 0.0,
    "diversity": 0.01,
    "classes": {"1": {"kid": 57.3, "recall": 0.0, "diversity": 0.01}},
    "collapsed": {"1": REASONS},
}
SNAPSHOT = {"snapshot": "best", "by": f"lowest kid in {METRIC_FILE}", "kid": 41.0}
# metric-texture.jsonl of the GAN run: a collapsed start, a better snapshot, a torn last line
METRIC_LINES = [
    {
        "step": 5,
        "kimg": 0.08,
        "kid": 57.3,
        "precision": 0.0,
        "recall": 0.0,
        "coverage": 0.0,
        "diversity": 0.007,
        "classes": {"1": {"kid": 57.3, "diversity": 0.007}},
        "collapsed": {"1": REASONS},
        "seconds": 2.1,
    },
    {
        "step": 10,
        "kimg": 0.16,
        "kid": 41.0,
        "precision": 0.5,
        "recall": 0.3,
        "coverage": 0.4,
        "diversity": 0.8,
        "class_accuracy": 0.75,
        "synth_real_accuracy": 0.7,
        "real_class_accuracy": 0.9,
        "classes": {
            "1": {"kid": 41.0, "diversity": 0.8, "class_accuracy": 0.75, "synth_real_accuracy": 0.7}
        },
        "collapsed": {},
        "seconds": 2.0,
    },
]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic(
    folder: Path,
    label: int,
    count: int = 20,
    quality: dict | None = HEALTHY,
    checkpoint_path: str = "gan/run/ckpt.json",
) -> Path:
    """A generate-style output: one shard of flat-coloured 50x50 patches and its manifest
    (`quality` None: a manifest written before generate checked for collapse)."""
    folder.mkdir(parents=True)
    config = GenerateConfig(checkpoint="gan/run", out=str(folder), shards=1, per_shard=count)
    job = {"class_label": label, "output_size": 50, "seed": 0, "shards": 1, "per_shard": count}
    checkpoint = {
        "sha256": "c" * 64,
        "path": checkpoint_path,
        "step": 10,
        "kimg": 0.16,
        "model": {},
        "train_config": {},
        "training_source": {"demo": True},
    }
    manifest = new_manifest(config, job, checkpoint)
    manifest["source"].update(
        snapshot=SNAPSHOT, checkpoint_path=checkpoint_path, checkpoint_step=checkpoint["step"]
    )
    manifest.pop("quality", None)
    if quality is not None:
        manifest["quality"] = quality
    rng = np.random.default_rng(label)
    samples = [
        Sample(
            f"syn-000000-{i:06d}",
            png(np.full((50, 50, 3), rng.integers(0, 255, 3), np.uint8)),
            label,
            {"synthetic": True, "patient": "synthetic"},
        )
        for i in range(count)
    ]
    entry = write_shard(folder / shard_name(0), samples)
    manifest["shards"] = [{"pool": "synthetic", **entry}]
    manifest["status"] = "complete"
    save_manifest(folder, manifest)
    return folder


def metrics(scenario: str, accuracy: float, manifests: list[dict], weights: str) -> dict:
    """A metrics.json as notes/contracts.md defines it."""
    data = {"images": 40, "counts": {"0": 20, "1": 20}, "manifests": manifests}
    return {
        "schema": "synthbreast-classify-metrics/1",
        "scenario": scenario,
        "task_id": 0,
        "train_source": f"{scenario.split('-')[0]} train",
        "test_source": f"{scenario.split('-')[-1]} test",
        "data": {"train": data, "test": {**data, "images": 30}},
        "model": {
            "backbone": "resnet18",
            "weights": weights,
            "mode": "frozen",
            "input_size": "native",
            "epochs": 3,
            "batch_size": 32,
            "lr": 0.001,
            "cached_features": True,
        },
        "accuracy": accuracy,
        "precision": 0.61,
        "recall": 0.62,
        "f1": 0.615,
        "balanced_accuracy": accuracy - 0.01,
        "roc_auc": accuracy + 0.05,
        "roc": {
            "fpr": [0, 0.1, 0.4, 1],
            "tpr": [0, accuracy - 0.2, accuracy, 1],
            "thresholds": [2, 0.9, 0.5, 0],
        },
        "confusion": {
            "labels": [0, 1],
            "counts": [[12, 3], [5, 10]],
            "row_percent": [[80.0, 20.0], [33.3, 66.7]],
        },
        "ci95": {
            "method": "patient bootstrap",
            "n_boot": 1000,
            "seed": 0,
            "accuracy": [accuracy - 0.1, accuracy + 0.05],
            "roc_auc": [0.5, 0.9],
        },
        "history": [{"epoch": 1, "train_loss": 0.7, "train_accuracy": 0.5}],
        "seconds": 1.5,
        "device": "cpu",
        "created_by": "synthbreast 0.1.0",
    }


def write_runs(runs: Path, demo_shards: Path, quality: dict | None = HEALTHY) -> Path:
    shards = runs / "shards"
    shutil.copytree(demo_shards, shards)
    gan = runs / "gan" / GAN_RUN
    synthetic = write_synthetic(
        runs / "synthetic" / "class1",
        label=1,
        quality=quality,
        checkpoint_path=str(gan / "checkpoints" / "ckpt-000000010.json"),
    )
    real_manifest = {
        "path": str(shards / "manifest.json"),
        "sha256": sha256_file(shards / "manifest.json"),
    }
    synth_manifest = {
        "path": str(synthetic / "manifest.json"),
        "sha256": "0" * 64,
    }  # stale on purpose
    for name, accuracy in OK_SCENARIOS.items():
        folder = runs / "classify" / name
        folder.mkdir(parents=True)
        atomic_write_json(folder / "config.json", {"job": "ClassifyConfig", "scenario": name})
        weights = "none" if name == "real-real" else "imagenet"
        atomic_write_json(
            folder / "metrics.json",
            metrics(name, accuracy, [real_manifest, synth_manifest], weights),
        )
    failed = runs / "classify" / FAILED_SCENARIO
    failed.mkdir()
    atomic_write_json(
        failed / "config.json", {"job": "ClassifyConfig", "scenario": FAILED_SCENARIO}
    )
    atomic_write_json(
        failed / "failed.json",
        {"scenario": FAILED_SCENARIO, "task_id": 3, "error": ERROR, "when": "2024-01-01T00:00:00"},
    )

    (gan / "samples").mkdir(parents=True)
    atomic_write_json(
        gan / "config.json", to_dict(TrainGANConfig(shards=str(shards), class_label=1))
    )
    lines = [
        {"step": s, "kimg": s * 0.016, "d_loss": 5.0 / s, "g_loss": -1.0 + 0.1 * s, "gp": 0.1}
        for s in range(1, 11)
    ]
    (gan / "stats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    metric_text = "".join(json.dumps(line) + "\n" for line in METRIC_LINES)
    (gan / METRIC_FILE).write_text(metric_text + '{"step": 15, "kimg": 0.2')
    fakes = np.zeros((66, 66, 3), np.uint8)
    fakes[::2] = 200
    (gan / "samples" / "fakes-000000010.png").write_bytes(png(fakes))
    return runs


@pytest.fixture(scope="module")
def report(demo_shards, tmp_path_factory) -> Path:
    """RUNS written by hand, reported once by the real CLI; returns the report folder."""
    runs = write_runs(tmp_path_factory.mktemp("report") / "runs", demo_shards)
    out = runs / "report"
    result = CliRunner().invoke(
        app, ["report", str(runs), "--out", str(out), "--grid-per-class", "16"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out / "report.html")
    return out


def scenario_rows(md: str) -> dict[str, str]:
    """The lines of the scenario table by scenario name."""
    table = md.split("\n## Scenarios\n")[1].strip().split("\n\n")[0]
    return {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}


def test_report_has_every_section_and_lists_failed_and_missing(report):
    md = (report / "report.md").read_text()
    for section in SECTIONS:
        assert f"\n## {section}\n" in md, section
    rows = scenario_rows(md)
    # our number beside the paper's, with its interval
    assert "| 0.700 [0.600, 0.750] | 0.84 |" in rows["real-real"]
    assert "| 0.950 [0.850, 1.000] | 0.99 |" in rows["synth-synth"]
    assert NOT_COMPARABLE in rows["real-real"] and "ImageNet" in rows["real-synth"]
    assert f"failed: {ERROR}" in rows[FAILED_SCENARIO]
    assert (
        rows[MISSING_SCENARIO]
        .rstrip(" |")
        .endswith("missing: no run folder found under " + str(report.parent))
    )
    assert "| — |" in rows[MISSING_SCENARIO]  # no paper number for real+synth-real
    missing_list = md.split("### Missing or failed runs")[1].split("\n## ")[0]
    assert (
        f"- {MISSING_SCENARIO}: missing" in missing_list
        and f"- {FAILED_SCENARIO}: failed" in missing_list
    )
    # figures are files beside the report, linked by relative path
    for link in re.findall(r"\]\((figures/[^)]+)\)", md):
        assert (report / link).is_file(), link
    assert "figures/roc.svg" in md and "figures/losses-00000-msggan-gan-class1-32px.svg" in md
    assert "figures/grid-real-class0.png" in md and "figures/grid-synthetic-class1.png" in md
    assert "No synthetic images of class 0 found." in md
    assert "Fidelity was not run" in md
    assert "DEMO DATA" in md
    # provenance: config path and manifest checksums, with whether they still match
    shards_sha = sha256_file(report.parent / "shards" / "manifest.json")
    assert f"`{shards_sha}` (same file now)" in md
    assert "(CHANGED since the run)" in md
    assert "runs/classify/real-real/config.json" in md


def test_metrics_csv_has_a_row_per_scenario(report):
    rows = list(csv.DictReader((report / "metrics.csv").open()))
    assert [r["scenario"] for r in rows] == [*OK_SCENARIOS, FAILED_SCENARIO, MISSING_SCENARIO]
    by_name = {r["scenario"]: r for r in rows}
    assert by_name["real-real"]["status"] == "ok"
    assert float(by_name["real-real"]["accuracy"]) == 0.7
    assert float(by_name["real-real"]["paper_accuracy"]) == 0.84
    assert (
        by_name[FAILED_SCENARIO]["status"] == "failed"
        and by_name[FAILED_SCENARIO]["error"] == ERROR
    )
    assert by_name[MISSING_SCENARIO]["status"] == "missing"
    assert (
        by_name[MISSING_SCENARIO]["accuracy"] == ""
        and by_name[MISSING_SCENARIO]["paper_accuracy"] == ""
    )


class TagChecker(HTMLParser):
    """Balanced tags (void elements aside) and the src of every <img>."""

    VOID = frozenset(
        {
            "area",
            "base",
            "br",
            "col",
            "embed",
            "hr",
            "img",
            "input",
            "link",
            "meta",
            "source",
            "track",
            "wbr",
        }
    )

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, tuple]] = []
        self.errors: list[str] = []
        self.img_srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.img_srcs.append(dict(attrs).get("src", ""))
        if tag not in self.VOID:
            self.stack.append((tag, self.getpos()))

    def handle_startendtag(self, tag, attrs):
        if tag == "img":
            self.img_srcs.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1:]}")
            return
        self.stack.pop()


def test_report_html_is_valid_and_self_contained(report):
    text = (report / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    checker = TagChecker()
    checker.feed(text)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, checker.stack
    # every picture inside the file: PNGs as data: URIs, plots as inline SVG
    assert len(checker.img_srcs) == 4  # real class 0 and 1, synthetic class 1, GAN snapshot
    assert all(src.startswith("data:image/png;base64,") for src in checker.img_srcs)
    svgs = re.findall(r"<svg\b.*?</svg>", text, flags=re.S)
    # ROC and one GAN run's losses, kid, diversity, class accuracy and synth-real accuracy
    assert len(svgs) == 6
    for svg in svgs:
        ET.fromstring(svg)
    roc = ET.fromstring(svgs[0])
    lines = roc.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == len(OK_SCENARIOS)
    for section in SECTIONS:
        assert f">{section}</h2>" in text


def test_report_follows_the_runs_fidelity_and_a_new_result(report, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(report.parent, runs, ignore=shutil.ignore_patterns("report"))
    fidelity = runs / "fidelity"
    fidelity.mkdir()
    (fidelity / "pca.png").write_bytes(png(np.full((20, 20, 3), 90, np.uint8)))
    overall = {
        "fid": 12.5,
        "kid_mean": 0.01,
        "kid_std": 0.002,
        "precision": 0.7,
        "recall": 0.6,
        "density": 0.9,
        "coverage": 0.8,
    }
    atomic_write_json(
        fidelity / "fidelity.json",
        {
            "schema": FIDELITY_SCHEMA,
            "config": {},
            "extractors": {
                "pixels": {"overall": overall, "per_class": {"1": overall}},
                "histology": {
                    "overall": overall,
                    "floor": {
                        "overall": {
                            "images": 40,
                            "synthetic": {"fid": 30.0, "kid_mean": 0.05, "recall": 0.2},
                            "real_vs_real": {"fid": 10.0, "kid_mean": 0.01, "recall": 0.9},
                            "ratio": {"fid": 3.0, "kid_mean": 5.0},
                        }
                    },
                },
            },
            "skipped": {"inception": "no weights file"},
            "pca_png": "pca.png",
        },
    )
    # fidelity's histology space is a real-real classify run in its feature cache, newer than
    # the chain's own: the scenario table keeps the chain's result
    space = fidelity / "features" / "histology-0123456789abcdef" / "real-real"
    space.mkdir(parents=True)
    atomic_write_json(space / "config.json", {"job": "ClassifyConfig", "scenario": "real-real"})
    atomic_write_json(space / "metrics.json", metrics("real-real", 0.97, [], "none"))
    late = runs / "classify" / MISSING_SCENARIO
    late.mkdir()
    atomic_write_json(late / "metrics.json", metrics(MISSING_SCENARIO, 0.8, [], "imagenet"))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["report", str(runs), "--out", str(out), "--grid-per-class", "4"]
    )
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "| pixels | overall | 12.500 | 0.010 |" in md
    # beside its real-vs-real floor: synthetic FID, the floor's, their ratio
    assert "| histology | overall | 40 | 30.000 | 10.000 | 3.000 | 0.050 | 0.010 |" in md
    assert "inception not computed: no weights file" in md
    assert (out / "figures" / "fidelity-pca.png").is_file()
    real_real = OK_SCENARIOS["real-real"]
    assert f"| {real_real:.3f} [" in scenario_rows(md)["real-real"]
    assert "0.970" not in scenario_rows(md)["real-real"]
    row = scenario_rows(md)[MISSING_SCENARIO]
    assert "| 0.800 [0.700, 0.850] | — |" in row and row.rstrip(" |").endswith("ok")
    html_text = (out / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") == 5  # the fidelity PNG joined the four


def test_report_of_a_missing_runs_folder_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "is not a folder" in result.output


def test_svg_plot_is_well_formed_with_round_ticks():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-123, 4567) == [0, 1000, 2000, 3000, 4000]
    svg = line_plot(
        [Series("a <b>", range(2000), [i * i for i in range(2000)]), Series("c", [0, 1], [1, 0])],
        "t & u",
        "x",
        "y",
    )
    root = ET.fromstring(svg)
    lines = root.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2
    assert len(lines[0].get("points").split()) <= 601  # long series are thinned
    assert "a <b>" in "".join(root.itertext())


def test_report_of_a_started_run_without_a_result(tmp_path):
    """An array task killed before its result: known by its task id, reported as missing."""
    started = tmp_path / "runs" / "classify" / "task-1"
    started.mkdir(parents=True)
    atomic_write_json(started / "config.json", {"job": "ClassifyConfig", "task_id": 1})
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = scenario_rows((out / "report.md").read_text())
    assert "missing: " in rows["synth-synth"] and "no metrics.json" in rows["synth-synth"]
    assert all("no run folder found" in rows[name] for name in rows if name != "synth-synth")
    assert "No shard folders (manifest.json) found under RUNS" in (out / "report.md").read_text()


# --- banners and the collapse check ---------------------------------------------------------


def report_of(runs: Path, out: Path) -> tuple[str, str]:
    """report.md and report.html of RUNS, made by the real CLI."""
    result = CliRunner().invoke(
        app, ["report", str(runs), "--out", str(out), "--grid-per-class", "4"]
    )
    assert result.exit_code == 0, result.output
    return (out / "report.md").read_text(), (out / "report.html").read_text()


def section(md: str, title: str) -> str:
    return md.split(f"\n## {title}\n")[1].split("\n## ")[0]


def test_a_collapsed_generator_is_announced_above_everything_synthetic(demo_shards, tmp_path):
    runs = write_runs(tmp_path / "runs", demo_shards, quality=COLLAPSED)
    fidelity = runs / "fidelity"
    fidelity.mkdir()
    atomic_write_json(
        fidelity / "fidelity.json",
        {
            "schema": FIDELITY_SCHEMA,
            "extractors": {"pixels": {"overall": {"fid": 80.0}}},
        },
    )
    md, html_text = report_of(runs, tmp_path / "report")
    banner = (
        "> **GENERATOR COLLAPSED: the synthetic images of class 1 (`runs/synthetic/class1`) are "
        f"collapsed: {'; '.join(REASONS)}. Every number that uses synthetic images is "
        f"meaningless. Remedy: {REMEDY}.**"
    )
    # at the top, and again above the first table or figure of each section of synthetic images
    assert md.count(banner) == 6, md.count(banner)
    assert md.index(banner) < md.index("\n## Scenarios\n")
    for title, first in (
        ("Scenarios", "| scenario | train | test |"),
        ("ROC curves", "![ROC curves"),
        ("Confusion matrices", "*real-real*"),
        ("Sample grids", "### Class 1"),
        ("Fidelity", "| features | part |"),
    ):
        part = section(md, title)
        assert banner in part and part.index(banner) < part.index(first), title
    assert "COLLAPSED (class 1)" in section(md, "GAN training")
    start = '<p class="warn">GENERATOR COLLAPSED: the synthetic images of class 1 '
    assert html_text.count(start + "(<code>runs/synthetic/class1</code>) are collapsed") == 6
    assert html_text.index(start) < html_text.index('id="scenarios"')
    scenarios = html_text.split('id="scenarios"')[1]
    assert scenarios.index(start) < scenarios.index("<th>scenario</th>")
    assert f"Remedy: {html.escape(REMEDY)}.</p>" in html_text


@pytest.mark.parametrize(
    ("quality", "verdict"),
    [
        (None, "not checked (the manifest is older than the check)"),
        ({"checked": False, "why": "no shards"}, "not checked: no shards"),
    ],
)
def test_an_unchecked_synthetic_set_has_no_banner(demo_shards, tmp_path, quality, verdict):
    md, html_text = report_of(write_runs(tmp_path / "runs", demo_shards, quality), tmp_path / "r")
    assert "GENERATOR COLLAPSED" not in md and "GENERATOR COLLAPSED" not in html_text
    assert f"| {verdict} |" in section(md, "GAN training")


def test_a_healthy_set_has_no_banner_and_the_gan_section_shows_the_snapshot_checks(report):
    md = (report / "report.md").read_text()
    html_text = (report / "report.html").read_text()
    assert "GENERATOR COLLAPSED" not in md and "GENERATOR COLLAPSED" not in html_text
    assert "DOMAIN GAP" not in md  # synth-real failed: nothing to compare
    gan = section(md, "GAN training")
    # every metric-texture.jsonl line: step, kimg, kid, precision, recall, coverage,
    # diversity, class accuracy, synth-real accuracy (a dash where the line has none),
    # collapsed classes, and
    # which snapshot is best and which generate drew from
    assert f"| 5 | 0.080 | 57.30 | 0.000 | 0.000 | 0.000 | 0.007 | {DASH} | {DASH} | 1 |  |" in gan
    assert (
        "| 10 | 0.160 | 41.00 | 0.500 | 0.300 | 0.400 | 0.800 | 0.750 | 0.700 | none | best: "
        "the newest of the snapshots with recall >= 0.10 in every class whose "
        "synth_real_accuracy is within 0.10 of the highest (lowest kid without classes); "
        "generate used it: `runs/synthetic/class1` |"
    ) in gan
    assert f"figures/snapshots-kid-{GAN_RUN}.svg" in gan
    assert f"figures/snapshots-diversity-{GAN_RUN}.svg" in gan
    assert (report / "figures" / f"snapshots-diversity-{GAN_RUN}.svg").is_file()
    # class_accuracy where a line has it, beside the real images' own (the dashed line)
    accuracy_plot = report / "figures" / f"snapshots-class_accuracy-{GAN_RUN}.svg"
    assert "real held-out images" in accuracy_plot.read_text()
    synth_real_plot = report / "figures" / f"snapshots-synth_real_accuracy-{GAN_RUN}.svg"
    assert "real held-out images" in synth_real_plot.read_text()
    # the synthetic set: the snapshot generate chose, its check's figures and the verdict
    assert (
        f"| `runs/synthetic/class1` | 1 | best, step 10 (lowest kid in {METRIC_FILE}) | "
        "12.30 | 0.400 | 0.900 | ok |"
    ) in gan
    # the torn last line is a problem, not a traceback
    assert f"{GAN_RUN}/{METRIC_FILE}:3: not a JSON line (skipped)" in section(md, "Provenance")


GAP_TEXT = (
    "DOMAIN GAP: a classifier trained on real images separates the synthetic classes perfectly "
    "(real-synth 1.000) while one trained on synthetic images does poorly on real ones "
    "(synth-real balanced accuracy 0.51 vs real-real 0.78): the synthetic classes are easy "
    "caricatures, not a twin of the real ones."
)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        # scenario -> (accuracy, balanced accuracy)
        (
            {"real-real": (0.79, 0.78), "real-synth": (1.0, 1.0), "synth-real": (0.52, 0.51)},
            GAP_TEXT,
        ),
        (
            {"synth-synth": (0.99, 0.99), "synth-real": (0.56, 0.55)},
            "(synth-synth 0.990) while one trained on synthetic images does poorly on real ones "
            "(synth-real balanced accuracy 0.55 (chance 0.5))",
        ),
        ({"real-real": (0.79, 0.78), "real-synth": (0.97, 0.97), "synth-real": (0.52, 0.51)}, None),
        ({"real-real": (0.79, 0.78), "real-synth": (1.0, 1.0), "synth-real": (0.71, 0.70)}, None),
        ({"real-real": (0.79, 0.78), "real-synth": (1.0, 1.0)}, None),
        # classes swapped across domains (the real sample with ImageNet features): AUC < 0.45
        (
            {"real-real": (0.83, 0.66, 0.85), "real-synth": (0.41, 0.41, 0.40)},
            "ranked worse than chance (real-synth AUC 0.400; chance 0.5)",
        ),
        ({"real-real": (0.83, 0.66, 0.85), "synth-real": (0.6, 0.6, 0.47)}, None),
    ],
)
def test_domain_gap_banner(tmp_path, scores, expected):
    runs = tmp_path / "runs"
    for name, (accuracy, balanced, *auc) in scores.items():
        folder = runs / "classify" / name
        folder.mkdir(parents=True)
        result = metrics(name, accuracy, [], "imagenet")
        result["balanced_accuracy"] = balanced
        if auc:
            result["roc_auc"] = auc[0]
        atomic_write_json(folder / "metrics.json", result)
    md, html_text = report_of(runs, tmp_path / "report")
    if expected is None:
        assert "DOMAIN GAP" not in md and "DOMAIN GAP" not in html_text
        return
    banners = [line for line in md.splitlines() if line.startswith("> **DOMAIN GAP: ")]
    assert len(banners) == 2 and all(expected in line for line in banners), banners
    scenarios = section(md, "Scenarios")
    assert md.index(banners[0]) < md.index("\n## Scenarios\n")
    assert scenarios.index(banners[1]) < scenarios.index("| scenario | train | test |")
    assert '<p class="warn">DOMAIN GAP: ' in html_text


def test_odd_quality_and_metric_files_give_a_report_not_a_traceback(demo_shards, tmp_path):
    runs = write_runs(tmp_path / "runs", demo_shards, quality={"checked": True, "collapsed": [1]})
    odd = [[1, 2], {"step": "x", "kimg": None, "kid": "high", "classes": [1], "collapsed": "yes"}]
    (runs / "gan" / GAN_RUN / METRIC_FILE).write_text("".join(json.dumps(v) + "\n" for v in odd))
    md, _ = report_of(runs, tmp_path / "report")
    assert f"{GAN_RUN}/{METRIC_FILE}:1: not a JSON object (skipped)" in md
    assert "| x | — | — | — | — | — | — | — | — | — |  |" in section(md, "GAN training")
    assert "GENERATOR COLLAPSED" not in md


# --- unreadable results and what a fidelity.json may embed -----------------------------------


def test_an_unreadable_metrics_json_is_named_as_unreadable(report, tmp_path):
    """A metrics.json cut short (a full disk, a killed copy) is not 'running or killed': the
    row and the problems name the file and say it is unreadable."""
    runs = tmp_path / "runs"
    shutil.copytree(report.parent, runs, ignore=shutil.ignore_patterns("report"))
    cut = runs / "classify" / "real-real" / "metrics.json"
    cut.write_text(cut.read_text()[:300])
    no_keys = runs / "classify" / "synth-synth" / "metrics.json"
    whole = json.loads(no_keys.read_text())
    atomic_write_json(no_keys, {k: v for k, v in whole.items() if k != "accuracy"})
    md, _ = report_of(runs, tmp_path / "report")
    rows = scenario_rows(md)
    for name, why in (("real-real", "not JSON"), ("synth-synth", "no accuracy")):
        assert "running or killed" not in rows[name]
        assert rows[name].count("missing: ") == 1, rows[name]
        path = runs / "classify" / name / "metrics.json"
        assert f"{path} is unreadable ({why}" in rows[name], rows[name]
        assert f"{path} is unreadable ({why}" in section(md, "Provenance")
    assert rows["real-synth"].rstrip(" |").endswith("ok")


def test_a_fidelity_json_embeds_only_its_own_figures_under_safe_names(report, tmp_path):
    """fidelity.json is data, not a list of files to publish: a path out of its folder, an
    absolute path, a link out, a file that is no PNG, or an unknown name is not embedded (each
    is a problem line); extractor names become safe figure file names."""
    runs = tmp_path / "runs"
    shutil.copytree(report.parent, runs, ignore=shutil.ignore_patterns("report"))
    secret = tmp_path / "secret.png"  # outside RUNS: must never reach the report
    secret.write_bytes(png(np.full((8, 8, 3), 7, np.uint8)))
    fidelity = runs / "fidelity"
    fidelity.mkdir()
    (fidelity / "pca-pixels.png").write_bytes(png(np.full((20, 20, 3), 90, np.uint8)))
    (fidelity / "closest-pairs-x.png").symlink_to(secret)
    (fidelity / "histograms.png").write_text("not a png")
    good = png(np.full((12, 12, 3), 30, np.uint8))
    (fidelity / "closest-pairs-evil.png").write_bytes(good)
    overall = {"fid": 1.0}

    def entry(closest: str) -> dict:
        return {"overall": overall, "memorisation": {"closest_pairs_png": closest}}

    atomic_write_json(
        fidelity / "fidelity.json",
        {
            "schema": FIDELITY_SCHEMA,
            "extractors": {
                "pixels": entry("../../secret.png"),
                "../../../escape me": entry("closest-pairs-evil.png"),
                "linked": entry("closest-pairs-x.png"),
                "absolute": entry(str(secret)),
            },
            "pca_png": "pca-pixels.png",
            "histograms_png": "histograms.png",
        },
    )
    out = tmp_path / "report"
    md, html_text = report_of(runs, out)
    assert html_text.count("data:image/png;base64,") == 4 + 2, "the four grids, pca, evil"
    secret_b64 = __import__("base64").b64encode(secret.read_bytes()).decode()
    assert secret_b64 not in html_text
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "fidelity-pca.png" in figures
    assert "fidelity-closest-escape-me.png" in figures, figures
    assert (out / "figures" / "fidelity-closest-escape-me.png").read_bytes() == good
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) for name in figures), figures
    written = {p.resolve() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    outside = {p for p in written if out.resolve() not in p.parents and runs.resolve() not in
               p.parents and p != secret.resolve()}  # fmt: skip
    assert not outside, outside
    problems = section(md, "Provenance")
    fidelity_json = fidelity / "fidelity.json"
    assert f"{fidelity_json}: closest-pixels '../../secret.png' is not a figure" in problems
    assert f"{fidelity_json}: closest-absolute '{secret}' is not a figure" in problems
    assert f"{fidelity_json}: closest-linked 'closest-pairs-x.png' links out of" in problems
    assert f"{fidelity_json}: histograms_png 'histograms.png' is not a PNG file" in problems


def test_three_classes_of_demo_mammograms_are_named_so(demo_shards, tmp_path):
    """A 3-class run on the demo films: the banner names mammograms and MIAS (not IDC), the
    combined ROC section points to the per-class curves, and each class has its ROC plot."""
    from synthbreast.eval.metrics import multiclass_metrics

    runs = tmp_path / "runs"
    shards = runs / "shards"
    shutil.copytree(demo_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["source"] |= {"format": "mias", "class_names": ["healthy", "benign", "malignant"]}
    save_manifest(shards, manifest)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet([1, 1, 1], size=30) + np.eye(3)[y]
    probs /= probs.sum(axis=1, keepdims=True)
    patients = [f"p{i % 6}" for i in range(30)]
    result = multiclass_metrics(
        y, probs, patients, n_boot=50, class_names=["healthy", "benign", "malignant"]
    )
    real = {"path": str(shards / "manifest.json"), "sha256": sha256_file(shards / "manifest.json")}
    metrics_json = metrics("real-real", result["accuracy"], [real], "none") | result
    folder = runs / "classify" / "real-real"
    folder.mkdir(parents=True)
    atomic_write_json(folder / "config.json", {"job": "ClassifyConfig", "scenario": "real-real"})
    atomic_write_json(folder / "metrics.json", metrics_json)
    md, _ = report_of(runs, tmp_path / "report")
    banner = next(line for line in md.splitlines() if "DEMO DATA" in line)
    assert "mammograms" in banner and "MIAS" in banner and "IDC" not in banner
    assert "the ROC curves are per class" in section(md, "ROC curves")
    # the paper measured IDC patches: no paper column beside mammograms
    assert "No paper column" in section(md, "Scenarios")
    assert "| 0.84 |" not in scenario_rows(md)["real-real"]
    for name in ("healthy", "benign", "malignant"):
        assert (tmp_path / "report" / "figures" / f"roc-{name}.svg").is_file()
