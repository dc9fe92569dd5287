"""`generate --filter class-probe`: only images a real-trained texture probe labels their class,
reproducibly, counted in the manifest, and a clear top-up where the probe disowns a class."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.data.shards import (
    decode_image,
    image_bytes,
    iter_shard,
    load_manifest,
    verify_shards,
)
from synthbreast.errors import UserError
from synthbreast.eval.quality import FILTER_DRAWS, FILTER_THRESHOLD
from synthbreast.generate import class_filter, load_generator, run_generate
from synthbreast.report.render import filter_text
from synthbreast.train.gan import train_gan
from tests.test_gan_quality import tiny, two_look_shards
from tests.test_generate import config, make_run

runner = CliRunner()


def probabilities(out) -> list[float]:
    return [
        json.loads(s["json"])["class_probability"]
        for path in sorted(out.glob("synthetic-*.tar"))
        for s in iter_shard(path)
    ]


@pytest.fixture(scope="module")
def early_run(tmp_path_factory):
    """A conditional model after 0.16 kimg on two looks anyone can tell apart (pale pink,
    dark blue): it already draws class 1's blue, and draws class 0 blue as well."""
    root = tmp_path_factory.mktemp("looks")
    shards = two_look_shards(root)
    config = tiny(shards, root / "runs", model="msggan-cond", kimg=0.16)
    return train_gan(config, progress_print=lambda _: None), shards


def draw(run, out, label: int, **overrides):
    job = config(run, out, shards=2, per_shard=6, class_label=label, snapshot="latest",
                 **overrides)  # fmt: skip
    run_generate(job, env={})
    return job, load_manifest(out)


@pytest.mark.slow
def test_kept_images_are_labelled_their_class_and_remade_bit_for_bit(early_run, tmp_path, capsys):
    run, _ = early_run
    # class 1: every kept image is one the probe labels class 1, none topped up
    job, manifest = draw(run, tmp_path / "c1", 1, filter="class-probe")
    assert manifest["job"]["filter"] == "class-probe" and manifest["status"] == "complete"
    verify_shards(tmp_path / "c1", manifest)
    for entry in manifest["shards"]:
        assert entry["count"] == 6 and entry["below_threshold"] == 0
        assert 6 <= entry["candidates"] <= FILTER_DRAWS * 6
    assert min(probabilities(tmp_path / "c1")) >= FILTER_THRESHOLD
    # class 0 is drawn blue: no candidate passes, each shard is topped up with the most
    # probable of its FILTER_DRAWS x 6 candidates, and generate says so
    capsys.readouterr()
    _, manifest = draw(run, tmp_path / "c0", 0, filter="class-probe")
    assert [e["below_threshold"] for e in manifest["shards"]] == [6, 6]
    assert [e["candidates"] for e in manifest["shards"]] == [FILTER_DRAWS * 6] * 2
    # the report's synthetic-set table says what was kept of what was drawn
    assert (
        filter_text(manifest)
        == f"class-probe: 12 of {FILTER_DRAWS * 12} drawn, 12 below the threshold"
    )
    said = capsys.readouterr().err
    assert "12 of 12 class-0 images" in said and "below the probe's threshold" in said
    # the top-up chose: the kept are more class-0-like than what the generator draws
    kept = probabilities(tmp_path / "c0")
    plain_job, _ = draw(run, tmp_path / "plain", 0)
    _, info = load_generator(run)
    info["training_source"] = {"class_names": ["0", "1"]}
    images = [
        np.asarray(decode_image(image_bytes(s)))
        for path in sorted((tmp_path / "plain").glob("synthetic-*.tar"))
        for s in iter_shard(path)
    ]
    unfiltered = class_filter(plain_job, info).probability(np.stack(images), 0)
    assert np.mean(kept) > float(unfiltered.mean())
    # a shard made again (deleted, then the same job) has the same bytes
    first = (tmp_path / "c1" / "synthetic-000001.tar").read_bytes()
    (tmp_path / "c1" / "synthetic-000001.tar").unlink()
    run_generate(job, env={})
    assert (tmp_path / "c1" / "synthetic-000001.tar").read_bytes() == first
    # and a job with another filter may not share the folder
    with pytest.raises(UserError, match="filter 'class-probe' there, 'none' now"):
        draw(run, tmp_path / "c1", 1)


def test_an_unknown_filter_and_a_missing_pool_are_one_line_errors(tmp_path):
    run = make_run(tmp_path / "00000-nopool", 1, 16)  # its checkpoint names no shards
    result = runner.invoke(app, ["generate", "--checkpoint", str(run), "--out",
                                 str(tmp_path / "a"), "--filter", "best"])  # fmt: skip
    assert result.exit_code == 2 and "--filter 'best' unknown" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["generate", "--checkpoint", str(run), "--out",
                                 str(tmp_path / "b"), "--shards", "1", "--per-shard", "2",
                                 "--filter", "class-probe"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--filter class-probe needs the GAN's training shards" in result.output
    assert "--filter none" in result.output and "Traceback" not in result.output
