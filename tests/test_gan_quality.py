"""The model registry, the conditional MSG-GAN, augmentation, the logistic loss, the quality
metric and the collapse verdict: units first, then real tiny trainings and generations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from synthbreast.cli import GanAugment, GanLoss, GanModel, app
from synthbreast.config import GenerateConfig, TrainGANConfig
from synthbreast.data.shards import iter_shard, load_manifest, pool_shards
from synthbreast.errors import UserError
from synthbreast.eval.quality import (
    COLLAPSE_DIVERSITY,
    TextureNet,
    best_snapshot,
    collapse_reasons,
    quality_metrics,
    synth_real_accuracy,
    texture_features,
)
from synthbreast.generate import load_generator, run_generate
from synthbreast.models.msggan import Discriminator, Generator, MSGGANConfig, image_pyramid
from synthbreast.models.registry import MODELS, get_model
from synthbreast.train.augment import AUGMENTS, AdaptiveP, Augment, dihedral
from synthbreast.train.checkpoint import save_checkpoint
from synthbreast.train.gan import METRIC_FILE, apply_budget, best_metric_step, train_gan
from synthbreast.train.losses import LOSSES, LossSettings, d_loss, r1_penalty

runner = CliRunner()


# --- registry and the conditional model ----------------------------------------------------


def test_cli_choices_are_the_registries():
    # train-gan offers the models its loop trains (SinGAN has its own command)
    assert [m.value for m in GanModel] == [n for n, s in MODELS.items() if s.trainer == "gan"]
    assert tuple(m.value for m in GanLoss) == LOSSES
    assert tuple(m.value for m in GanAugment) == AUGMENTS
    with pytest.raises(UserError, match="choose from msggan, msggan-cond"):
        get_model("stylegan9")


def test_conditional_generator_uses_the_label_and_projection_discriminator_too():
    config = MSGGANConfig(resolution=16, latent_dim=16, width=1 / 16, num_classes=3)
    torch.manual_seed(0)
    G, D = Generator(config), Discriminator(config)
    z = torch.randn(4, 16)
    zeros, twos = torch.zeros(4, dtype=torch.long), torch.full((4,), 2)
    images = G(z, zeros)
    assert [x.shape[-1] for x in images] == [4, 8, 16]
    assert torch.equal(G.sample(z, zeros), images[-1])
    assert not torch.allclose(G.sample(z, zeros), G.sample(z, twos))  # the label matters
    scores = D(images, zeros)
    assert scores.shape == (4,)
    assert not torch.allclose(scores, D(images, twos))  # the projection reads the label
    with pytest.raises(ValueError, match="conditional on 3 classes"):
        G(z)


def test_unconditional_state_dict_is_the_previous_layout():
    """No new parameters in the unconditional model: checkpoints written before the
    registry (no model_name, no num_classes) still load (tests/test_generate.py makes one)."""
    config = MSGGANConfig(resolution=16, latent_dim=16, width=1 / 16)
    names = set(Generator(config).state_dict()) | set(Discriminator(config).state_dict())
    assert not any("embed" in name for name in names)
    old = {k: v for k, v in config.to_dict().items() if k != "num_classes"}
    assert MSGGANConfig.from_dict(old) == config


def test_paper_config_builds_and_takes_one_training_step():
    spec = get_model("msggan")
    config = MSGGANConfig()  # the paper: 64 px, latent 512, width 1.0
    torch.manual_seed(0)
    G, D = spec.generator(config), spec.discriminator(config)
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    loss, stats = d_loss("wgan-gp", D, spec.real_input(real, config), G(torch.randn(2, 512)),
                         LossSettings(), step=0)  # fmt: skip
    loss.backward()
    assert math.isfinite(stats["gp"]) and all(p.grad is not None for p in D.parameters())


# --- augmentation ----------------------------------------------------------------------------


def test_diffaugment_is_the_same_transform_at_every_scale():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    pyramid = image_pyramid(images, [4, 8, 16, 32])
    augmented = Augment(6, 1.0, torch.Generator().manual_seed(1))(pyramid)
    top_pooled = torch.nn.functional.avg_pool2d(augmented[-1], 2)
    # colour commutes with pooling exactly; shifts and cutouts nearly (resampled at 16 px)
    assert (top_pooled - augmented[-2]).abs().mean() < 0.1
    other = Augment(6, 1.0, torch.Generator().manual_seed(2))(pyramid)
    assert (top_pooled - other[-2]).abs().mean() > 0.2  # other parameters: far apart
    assert torch.allclose(Augment(6, 0.0)(pyramid)[-1], pyramid[-1], atol=1e-5)  # p = 0


def test_augment_is_differentiable_and_dihedral_keeps_the_pixels():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    Augment(4, 1.0, torch.Generator().manual_seed(0))([x])[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    turned = dihedral(x.detach(), torch.Generator().manual_seed(0))
    for a, b in zip(x.detach(), turned, strict=True):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def test_ada_raises_p_when_d_is_sure_of_the_reals_and_lowers_it_otherwise():
    ada = AdaptiveP(batch_size=16, interval=4)
    for _ in range(40):
        ada.observe(torch.ones(16))  # r_t = 1 > 0.6: overfitting
    high = ada.p
    assert high > 0
    for _ in range(8):
        ada.observe(-torch.ones(16))
    assert ada.p < high


# --- the logistic loss with lazy R1 ------------------------------------------------------


def test_r1_penalty_of_a_linear_d_is_its_weight_norm():
    w = [torch.full((3, s, s), 0.1) for s in (4, 8)]

    def linear_d(scales):
        return sum((x * wi).flatten(1).sum(1) for x, wi in zip(scales, w, strict=True))

    squared, _ = r1_penalty(linear_d, [torch.rand(2, 3, 4, 4), torch.rand(2, 3, 8, 8)])
    expected = sum(float(wi.square().sum()) for wi in w)
    assert torch.allclose(squared, torch.full((2,), expected))
    settings = LossSettings(r1_gamma=1.0, r1_interval=4)
    real, fake = [torch.rand(2, 3, 4, 4), torch.rand(2, 3, 8, 8)], [torch.rand(2, 3, 4, 4)] * 2
    _, on = d_loss("logistic-r1", linear_d, real, [fake[0], torch.rand(2, 3, 8, 8)], settings, 8)
    _, off = d_loss("logistic-r1", linear_d, real, [fake[0], torch.rand(2, 3, 8, 8)], settings, 9)
    assert on["r1"] == pytest.approx(4 * 0.5 * expected, rel=1e-5) and "r1" not in off


def test_lazy_gradient_penalty_comes_every_n_steps_weighted_by_n():
    torch.manual_seed(0)
    D = torch.nn.Conv2d(3, 1, 4)  # scores one 4x4 scale: D(x) = conv(x), a known gradient

    def score(scales):
        return D(scales[0]).flatten()

    real, fake, alpha = [torch.rand(3, 3, 4, 4)], [torch.rand(3, 3, 4, 4)], torch.rand(3)
    eager = d_loss("wgan-gp", score, real, fake, LossSettings(), step=5, alpha=alpha)[1]
    lazy = LossSettings(gp_interval=4)
    on = d_loss("wgan-gp", score, real, fake, lazy, step=8, alpha=alpha)[1]
    off = d_loss("wgan-gp", score, real, fake, lazy, step=9, alpha=alpha)[1]
    assert on["gp"] == pytest.approx(4 * eager["gp"]) and "gp" not in off
    assert off["wasserstein"] == pytest.approx(eager["wasserstein"])


# --- the quality metric and the verdict ------------------------------------------------------


def real_patches(shards: Path, label: int) -> torch.Tensor:
    from synthbreast.data.shards import decode_image, image_bytes

    images = []
    for path in pool_shards(shards, load_manifest(shards), "gan"):
        for sample in iter_shard(path):
            if int(sample["cls"]) == label:
                images.append(np.asarray(decode_image(image_bytes(sample))))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def test_real_images_pass_and_a_flat_colour_is_collapse(demo_shards):
    net = TextureNet()
    real = real_patches(demo_shards, 0)
    half = len(real) // 2
    a, b = texture_features(net, real[:half]), texture_features(net, real[half:])
    real_vs_real = quality_metrics(a, b)
    assert real_vs_real["diversity"] > 0.7 and real_vs_real["recall"] > 0.3
    assert collapse_reasons(real_vs_real) == []
    flat = real.float().mean(dim=(0, 2, 3), keepdim=True).expand(64, 3, 50, 50)
    collapsed = quality_metrics(a, texture_features(net, flat.round().to(torch.uint8)))
    assert collapsed["diversity"] < COLLAPSE_DIVERSITY / 10 and collapsed["recall"] == 0
    assert len(collapse_reasons(collapsed)) == 2


def test_synth_real_accuracy_is_high_for_the_real_look_and_low_for_swapped_classes():
    """Fitted on the fakes, scored on the reals: fakes with each class's look score near 1,
    fakes whose classes are swapped near 0, though each looks like a real class."""
    rng = torch.Generator().manual_seed(0)
    real = {c: torch.randn(200, 16, generator=rng) + 3 * c for c in (0, 1)}
    like = {c: torch.randn(200, 16, generator=rng) + 3 * c for c in (0, 1)}
    swapped = {c: like[1 - c] for c in (0, 1)}
    assert min(synth_real_accuracy(like, real).values()) > 0.95
    assert max(synth_real_accuracy(swapped, real).values()) < 0.05


# --- real training and generation ----------------------------------------------------------


def tiny(shards: Path, outdir: Path, **overrides) -> TrainGANConfig:
    config = apply_budget(TrainGANConfig(shards=str(shards), outdir=str(outdir)), "tiny")
    return TrainGANConfig(**{**config.__dict__, "workers": 0, **overrides})


def two_look_shards(tmp_path: Path) -> Path:
    """Two classes anyone can tell apart: pale pink patches vs dark blue ones, with texture."""
    from PIL import Image

    from synthbreast.config import IngestConfig
    from synthbreast.data.ingest import run_ingest

    rng = np.random.default_rng(0)
    colours = {0: (235, 170, 200), 1: (60, 50, 150)}
    for patient in range(8):
        for label, colour in colours.items():
            folder = tmp_path / "src" / str(100 + patient) / str(label)
            folder.mkdir(parents=True)
            for i in range(24):
                noise = rng.normal(0, 25, (50, 50, 1))
                pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
                name = f"{100 + patient}_idx5_x{i}_y0_class{label}.png"
                Image.fromarray(pixels).save(folder / name)
    out = tmp_path / "shards"
    run_ingest(IngestConfig(src=str(tmp_path / "src"), out=str(out), shard_size=40, min_shards=2))
    return out


@pytest.mark.slow
def test_conditional_model_draws_each_class_look(tmp_path):
    """A real-trained classifier (nearest class mean colour) labels the generated classes."""
    shards = two_look_shards(tmp_path)
    config = tiny(shards, tmp_path / "runs", model="msggan-cond", kimg=1.2, snapshot_kimg=0.4,
                  checkpoint_kimg=0.4)  # fmt: skip
    run = train_gan(config, progress_print=lambda _: None)
    lines = [json.loads(t) for t in (run / METRIC_FILE).read_text().splitlines()]
    assert [line["kimg"] for line in lines] == [0.4, 0.8, 1.2]
    assert set(lines[-1]["classes"]) == {"0", "1"}
    # the snapshot metric's real-trained texture classifier tells the real classes apart and
    # labels each generated class as the class it was drawn for
    assert lines[-1]["real_class_accuracy"] > 0.95
    assert all(lines[-1]["classes"][c]["class_accuracy"] > 0.9 for c in ("0", "1"))
    # and the other direction: a texture classifier fitted on the fakes labels the real images
    assert all(lines[-1]["classes"][c]["synth_real_accuracy"] > 0.9 for c in ("0", "1"))
    G, info = load_generator(run)
    assert info["model_name"] == "msggan-cond" and G.config.num_classes == 2
    means = {c: real_patches(shards, c).float().mean(dim=(0, 2, 3)) for c in (0, 1)}
    correct = 0
    z = torch.randn(64, G.config.latent_dim, generator=torch.Generator().manual_seed(5))
    for label in (0, 1):
        images = (G.sample(z, torch.full((64,), label)).clamp(-1, 1) + 1) * 127.5
        colour = images.mean(dim=(2, 3))
        nearest = torch.stack([(colour - means[c]).norm(dim=1) for c in (0, 1)]).argmin(0)
        correct += int((nearest == label).sum())
    assert correct / 128 > 0.9


def constant_generator_run(run_dir: Path, shards: Path) -> Path:
    """A checkpoint whose generator ignores its latent: one flat colour (collapse)."""
    config = MSGGANConfig(resolution=32, latent_dim=16, width=1 / 16, num_classes=2)
    G = Generator(config)
    state = G.state_dict()
    state["to_rgb.3.weight"] = torch.zeros_like(state["to_rgb.3.weight"])
    state["to_rgb.3.bias"] = torch.tensor([0.6, 0.1, 0.4])
    save_checkpoint(run_dir, 10, {
        "model_name": "msggan-cond", "model": config.to_dict(), "G_ema": state,
        "config": {"shards": str(shards), "pool": "gan", "class_label": None}, "step": 10,
    })  # fmt: skip
    return run_dir


def test_a_collapsed_generator_is_announced_recorded_and_bannered(demo_shards, tmp_path, capsys):
    """A generator of one flat colour through generate and report: warning, verdict, banner."""
    from synthbreast.config import ReportConfig
    from synthbreast.report.render import run_report

    run = constant_generator_run(tmp_path / "runs" / "00000-flat", demo_shards)
    out = tmp_path / "runs" / "synthetic"
    job = GenerateConfig(checkpoint=str(run), out=str(out), shards=1, per_shard=16, class_label=1)
    run_generate(job, env={})
    quality = load_manifest(out)["quality"]
    assert quality["checked"] and quality["diversity"] < 0.01
    assert "diversity" in quality["collapsed"]["1"][0]
    said = capsys.readouterr().err  # the console logs on stderr
    assert "COLLAPSED (class 1)" in said and "--augment" in said
    run_report(ReportConfig(runs=str(tmp_path / "runs"), out=str(tmp_path / "report")))
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.count("GENERATOR COLLAPSED") >= 2 and "class 1" in report


def snapshot_line(step: int, kid: float, *recalls: float) -> dict:
    classes = {str(c): {"kid": kid, "recall": r} for c, r in enumerate(recalls)}
    return {"step": step, "kid": kid, "recall": sum(recalls) / len(recalls), "classes": classes}


def test_without_synth_real_accuracy_the_best_snapshot_is_the_trusted_lowest_kid():
    # the real IDC sample's run: KID alone took 10 kimg, whose class 0 then failed the gate
    lines = [
        snapshot_line(1250, 1.82, 0.084, 0.081),
        snapshot_line(1500, 1.93, 0.039, 0.093),
        snapshot_line(2250, 2.80, 0.282, 0.163),
        snapshot_line(2500, 1.97, 0.282, 0.183),
    ]
    assert best_snapshot(lines)["step"] == 2500
    assert best_snapshot(lines[:2])["step"] == 1250  # none has the recall: the lowest KID
    assert best_snapshot([{"step": 5, "kid": None}, lines[3]])["step"] == 2500
    assert best_snapshot([{"step": 5, "kid": 1.0}])["step"] == 5  # no recall measured
    assert best_snapshot([{"step": 5}]) is None


def test_a_model_of_several_classes_takes_the_newest_snapshot_near_the_best_synth_real():
    # the real sample's class-loss run of split 2 (2026-12-07): the highest synth_real_accuracy
    # (14 kimg) did worse downstream than the last snapshot, 0.08 below it
    lines = [
        {**snapshot_line(1750, 1.67, 0.11, 0.23), "synth_real_accuracy": 0.739},
        {**snapshot_line(2750, 1.53, 0.33, 0.45), "synth_real_accuracy": 0.625},
        {**snapshot_line(3250, 1.41, 0.22, 0.48), "synth_real_accuracy": 0.655},
        {**snapshot_line(3500, 5.00, 0.05, 0.50), "synth_real_accuracy": 0.900},  # untrusted
    ]
    assert best_snapshot(lines)["step"] == 3250
    # a later snapshot more than the tolerance below the best is passed over, and an earlier
    # one that leads the rest by more than the tolerance is taken
    worse = {**snapshot_line(3750, 1.20, 0.30, 0.30), "synth_real_accuracy": 0.600}
    assert best_snapshot([*lines, worse])["step"] == 3250
    assert best_snapshot([lines[0], worse])["step"] == 1750
    # a line without the figure (written before it existed): every line is ranked by KID
    assert best_snapshot([*lines[:3], snapshot_line(4000, 0.9, 0.3, 0.3)])["step"] == 4000


def test_snapshot_metric_picks_the_best_checkpoint(demo_shards, tmp_path):
    config = tiny(demo_shards, tmp_path / "runs", class_label=1, kimg=0.24, snapshot_kimg=0.08,
                  checkpoint_kimg=0.08)  # fmt: skip
    run = train_gan(config, progress_print=lambda _: None)
    lines = [json.loads(t) for t in (run / METRIC_FILE).read_text().splitlines()]
    assert len(lines) == 3 and all("diversity" in line for line in lines)
    best = best_snapshot(lines)
    assert best_metric_step(run)[0] == best["step"]
    out = tmp_path / "synthetic"
    result = runner.invoke(app, ["generate", "--checkpoint", str(run), "--out", str(out),
                                 "--shards", "1", "--per-shard", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    source = load_manifest(out)["source"]
    assert source["checkpoint_step"] == best["step"] and source["snapshot"]["snapshot"] == "best"
    latest = tmp_path / "latest"
    args = ["generate", "--checkpoint", str(run), "--out", str(latest), "--shards", "1"]
    result = runner.invoke(app, [*args, "--per-shard", "8", "--snapshot", "latest"])
    assert result.exit_code == 0, result.output
    assert load_manifest(latest)["source"]["checkpoint_step"] == lines[-1]["step"]


def test_generate_refuses_a_class_its_model_never_saw(demo_shards, tmp_path):
    config = tiny(demo_shards, tmp_path / "runs", class_label=0, kimg=0.016, metric_images=0)
    run = train_gan(config, progress_print=lambda _: None)
    job = GenerateConfig(checkpoint=str(run), out=str(tmp_path / "s"), shards=1, per_shard=4,
                         class_label=1)  # fmt: skip
    with pytest.raises(UserError, match="trained on class 0 alone"):
        run_generate(job, env={})
    with pytest.raises(UserError, match="trains every class in one model"):
        train_gan(tiny(demo_shards, tmp_path / "r2", model="msggan-cond", class_label=1))


def test_the_pipeline_gate_stops_on_a_collapsed_set_unless_told_to_go_on(demo_shards, tmp_path):
    from synthbreast.config import PipelineConfig
    from synthbreast.pipeline import stage_gate

    run = constant_generator_run(tmp_path / "00000-flat", demo_shards)
    out = tmp_path / "synthetic"
    job = GenerateConfig(checkpoint=str(run), out=str(out), shards=1, per_shard=8, class_label=0)
    run_generate(job, env={})
    with pytest.raises(UserError, match=r"collapsed.*class 0.*--augment.*--keep-going"):
        stage_gate(PipelineConfig(out=str(tmp_path)), [out])
    going_on = stage_gate(PipelineConfig(out=str(tmp_path), keep_going=True), [out])
    assert going_on.startswith("collapsed, going on")


def test_logistic_loss_with_ada_and_diffaug_train_and_record_p(demo_shards, tmp_path):
    for augment in ("ada", "diffaug"):
        config = tiny(demo_shards, tmp_path / augment, model="msggan-cond", loss="logistic-r1",
                      augment=augment, kimg=0.064, r1_interval=2, metric_images=0)  # fmt: skip
        run = train_gan(config, progress_print=lambda _: None)
        ticks = [json.loads(t) for t in (run / "stats.jsonl").read_text().splitlines()]
        assert all(math.isfinite(t["d_loss"]) and math.isfinite(t["g_loss"]) for t in ticks)
        assert ("augment_p" in ticks[-1]) == (augment == "ada")
        saved = json.loads((run / "config.json").read_text())
        assert saved["augment"] == augment and saved["loss"] == "logistic-r1"


@pytest.mark.parametrize("loss", LOSSES)
def test_the_class_loss_trains_with_either_loss_and_needs_a_conditional_model(
    demo_shards, tmp_path, loss
):
    # r1_interval 2: half the steps score the reals through R1's detached copies
    config = tiny(demo_shards, tmp_path / loss, model="msggan-cond", loss=loss, class_weight=1.0,
                  kimg=0.064, r1_interval=2, gp_interval=2, metric_images=0)  # fmt: skip
    run = train_gan(config, progress_print=lambda _: None)
    ticks = [json.loads(t) for t in (run / "stats.jsonl").read_text().splitlines()]
    assert all(0 <= t["d_class_acc"] <= 1 and math.isfinite(t["g_class_ce"]) for t in ticks)
    _, info = load_generator(run)
    assert info["model"]["d_classifier"] is True
    with pytest.raises(UserError, match=r"--class-weight 1\.0 needs class labels"):
        train_gan(tiny(demo_shards, tmp_path / "uncond", class_weight=1.0, class_label=0))
