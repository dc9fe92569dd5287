"""MSG-GAN generator and discriminator: shapes per scale, the paper's widths, config round
trip, and that each training step does only the work it needs (tiny CPU configs)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from synthbreast.models.msggan import (
    Discriminator,
    Generator,
    MSGGANConfig,
    NoiseInjection,
    image_pyramid,
    minibatch_stddev,
    param_count,
)
from synthbreast.train.losses import (
    ClassTerm,
    discriminator_loss,
    generator_loss,
    requires_grad,
)

# Measured for the paper config (64 px, width 1.0, latent 512); see the bench for timings.
PAPER_G_PARAMS = 22_498_063
PAPER_D_PARAMS = 22_780_413


def tiny_config(resolution: int = 64, width: float = 1 / 16) -> MSGGANConfig:
    return MSGGANConfig(resolution=resolution, latent_dim=32, width=width)


def tiny_models(config: MSGGANConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = config or tiny_config()
    return config, Generator(config), Discriminator(config)


@pytest.mark.parametrize(
    ("resolution", "width", "batch"), [(64, 1 / 16, 4), (128, 1 / 16, 4), (256, 1 / 32, 2)]
)
def test_shapes_per_scale(resolution, width, batch):
    config, G, D = tiny_models(tiny_config(resolution, width))
    assert config.scales() == [2**k for k in range(2, resolution.bit_length())]
    images = G(torch.randn(batch, config.latent_dim))
    assert [tuple(x.shape) for x in images] == [(batch, 3, s, s) for s in config.scales()]
    scores = D(images)
    assert scores.shape == (batch,)
    assert torch.isfinite(scores).all()


def test_paper_config_widths_and_params():
    config = MSGGANConfig()
    assert (config.resolution, config.latent_dim, config.width) == (64, 512, 1.0)
    assert {s: config.channels(s) for s in config.scales()} == {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256,
    }
    g_params, d_params = param_count(Generator(config)), param_count(Discriminator(config))
    print(f"\nMSG-GAN paper config (64 px, 5 blocks): G {g_params:,} params, D {d_params:,}")
    assert g_params == pytest.approx(PAPER_G_PARAMS, rel=0.01)
    assert d_params == pytest.approx(PAPER_D_PARAMS, rel=0.01)


def test_every_conv_width_is_aligned():
    """oneDNN is slow on channel counts that are not multiples of 16 (MSGGAN-NOTES.md)."""
    for width in (1.0, 0.125, 1 / 16, 0.3):
        _, G, D = tiny_models(MSGGANConfig(width=width))
        for module in (G, D):
            for name, param in module.named_parameters():
                if param.dim() == 4 and param.shape[-1] == 3:  # every 3x3 conv
                    out_ch, in_ch = param.shape[:2]
                    assert in_ch % 16 == 0 and out_ch % 16 == 0, (width, name, param.shape)


def test_config_json_round_trip_and_validation():
    config = MSGGANConfig(resolution=128, width=0.25, latent_dim=64)
    again = MSGGANConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError):
        MSGGANConfig(resolution=96)
    with pytest.raises(ValueError):
        MSGGANConfig(resolution=4)
    with pytest.raises(ValueError):
        MSGGANConfig.from_dict({**config.to_dict(), "depth": 5})


def test_image_pyramid_is_repeated_2x_pooling():
    x = torch.randn(2, 3, 32, 32)
    pyramid = image_pyramid(x, [4, 8, 16, 32])
    assert pyramid[-1] is x
    expected = x
    for level in reversed(pyramid[:-1]):
        expected = F.avg_pool2d(expected, 2)
        torch.testing.assert_close(level, expected)


def test_minibatch_stddev_groups_are_contiguous():
    """D([real; fake]) scores as D(real), D(fake) apart: groups never mix the two halves."""
    _, G, D = tiny_models()
    with torch.no_grad():
        a, b = G(torch.randn(4, 32)), G(torch.randn(4, 32))
        joint = D([torch.cat(pair) for pair in zip(a, b, strict=True)])
        torch.testing.assert_close(joint, torch.cat([D(a), D(b)]))
    # a batch that is not a multiple of the group size still works (groups of gcd)
    assert minibatch_stddev(torch.randn(6, 16, 4, 4), 4).shape == (6, 17, 4, 4)


def test_d_step_leaves_generator_grads_none():
    config, G, D = tiny_models()
    real = image_pyramid(torch.randn(4, 3, 64, 64), config.scales())
    with torch.no_grad():
        fake = G(torch.randn(4, config.latent_dim))
    loss, _ = discriminator_loss(D, real, fake)
    loss.backward()
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None for p in D.parameters())


def test_g_step_with_frozen_d_leaves_d_grads_none():
    config, G, D = tiny_models()
    requires_grad(D, False)
    loss, _ = generator_loss(D, G(torch.randn(4, config.latent_dim)))
    loss.backward()
    assert all(p.grad is None for p in D.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters())
    requires_grad(D, True)
    assert all(p.requires_grad for p in D.parameters())


def test_a_few_training_steps_stay_finite():
    config, G, D = tiny_models()
    g_opt = torch.optim.RMSprop(G.parameters(), lr=1e-4)
    d_opt = torch.optim.RMSprop(D.parameters(), lr=1e-4)
    real = image_pyramid(torch.rand(4, 3, 64, 64) * 2 - 1, config.scales())
    before = [p.detach().clone() for p in G.parameters()]
    for _ in range(4):
        requires_grad(D, True)
        with torch.no_grad():
            fake = G(torch.randn(4, config.latent_dim))
        d_loss, d_stats = discriminator_loss(D, real, fake)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()

        requires_grad(D, False)
        g_loss, g_stats = generator_loss(D, G(torch.randn(4, config.latent_dim)))
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        values = [*d_stats.values(), *g_stats.values()]
        assert all(torch.isfinite(torch.tensor(v)) for v in values), (d_stats, g_stats)
    assert any(not torch.equal(a, b) for a, b in zip(before, G.parameters(), strict=True))


def test_reflect_padding_keeps_shapes_and_parameters_and_changes_the_border():
    zeros = MSGGANConfig(resolution=32, latent_dim=32, width=1 / 16)
    reflect = MSGGANConfig(resolution=32, latent_dim=32, width=1 / 16, g_padding="reflect")
    torch.manual_seed(0)
    G0 = Generator(zeros)
    G1 = Generator(reflect)
    G1.load_state_dict(G0.state_dict())  # same parameters: padding has none
    z = torch.randn(2, 32)
    a, b = G0(z), G1(z)
    assert [x.shape for x in a] == [x.shape for x in b]
    # the padding reaches every pixel of the small scales, so compare where it must differ
    assert not torch.allclose(a[-1][..., 0, :], b[-1][..., 0, :])
    with pytest.raises(ValueError, match="g_padding"):
        MSGGANConfig(g_padding="circularish")


def test_noise_starts_silent_is_reproducible_with_a_generator_and_varies_without():
    plain = MSGGANConfig(resolution=32, latent_dim=32, width=1 / 16)
    noisy = MSGGANConfig(resolution=32, latent_dim=32, width=1 / 16, g_noise="all")
    torch.manual_seed(0)
    G0, G1 = Generator(plain), Generator(noisy)
    missing, unexpected = G1.load_state_dict(G0.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".noise" in name for name in missing)
    z = torch.randn(3, 32)
    # a new model's noise weights are 0: it draws what the noiseless model draws
    assert torch.equal(G0.sample(z), G1.sample(z, None, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for block in G1.blocks:
            block.noise1.weight.fill_(0.3)
            block.noise2.weight.fill_(0.3)
    a = G1.sample(z, None, torch.Generator().manual_seed(1))
    b = G1.sample(z, None, torch.Generator().manual_seed(1))
    c = G1.sample(z, None, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3  # the noise reaches the image
    # the training forward's top scale is sample's image when both see the same noise
    torch.manual_seed(5)
    top = G1(z)[-1]
    torch.manual_seed(5)
    assert torch.allclose(top, G1(z)[-1])


def test_coarse_noise_leaves_the_top_block_noiseless():
    config = MSGGANConfig(resolution=32, latent_dim=32, width=1 / 16, g_noise="coarse")
    G = Generator(config)
    assert [block.noise1 is not None for block in G.blocks] == [True, True, False]
    with pytest.raises(ValueError, match="g_noise"):
        MSGGANConfig(g_noise="everywhere")


def test_generator_floor_widens_g_at_the_fine_scales_and_leaves_d_alone():
    narrow = MSGGANConfig(resolution=64, latent_dim=32, width=1 / 16)
    floored = MSGGANConfig(resolution=64, latent_dim=32, width=1 / 16, g_fmap_min=32)
    assert [narrow.g_channels(s) for s in narrow.scales()] == [32, 32, 32, 32, 16]
    assert [floored.g_channels(s) for s in floored.scales()] == [32, 32, 32, 32, 32]
    G = Generator(floored)
    assert G.blocks[-1].conv2.weight.shape[0] == 32 and G.to_rgb[-1].weight.shape[1] == 32
    assert [x.shape[-1] for x in G(torch.randn(2, 32))] == floored.scales()
    D_narrow, D_floored = Discriminator(narrow), Discriminator(floored)
    assert [p.shape for p in D_narrow.parameters()] == [p.shape for p in D_floored.parameters()]
    # a checkpoint's config from before the field has none: the generator it built is rebuilt
    old = {k: v for k, v in narrow.to_dict().items() if k != "g_fmap_min"}
    assert MSGGANConfig.from_dict(old) == narrow
    with pytest.raises(ValueError, match="g_fmap_min"):
        MSGGANConfig(g_fmap_min=24)


def test_class_modulation_starts_as_the_input_conditioned_model_and_then_splits_classes():
    kw = dict(resolution=32, latent_dim=32, width=1 / 16, num_classes=2)
    plain, modulated = MSGGANConfig(**kw), MSGGANConfig(**kw, g_condition="modulate")
    torch.manual_seed(0)
    G0, G1 = Generator(plain), Generator(modulated)
    missing, unexpected = G1.load_state_dict(G0.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".modulate." in name for name in missing)
    z, labels = torch.randn(4, 32), torch.tensor([0, 1, 0, 1])
    # new modulation weights are 0: it draws what the input-conditioned model draws
    assert all(torch.equal(a, b) for a, b in zip(G0(z, labels), G1(z, labels), strict=True))
    with torch.no_grad():
        for block in G1.blocks:
            block.modulate.affine.weight.normal_()
    same_z = torch.cat([z[:1], z[:1]])
    top = G1.sample(same_z, torch.tensor([0, 1]))
    top_plain = G0.sample(same_z, torch.tensor([0, 1]))
    # the same latent drawn as class 0 and class 1 now differs by more than the input
    # embedding alone makes it differ
    assert (top[0] - top[1]).abs().mean() > (top_plain[0] - top_plain[1]).abs().mean()
    assert torch.equal(G1.sample(z, labels), G1(z, labels)[-1])
    with pytest.raises(ValueError, match="g_condition"):
        MSGGANConfig(**kw, g_condition="everywhere")
    with pytest.raises(ValueError, match="conditional"):
        MSGGANConfig(resolution=32, g_condition="modulate")  # nothing to modulate by


def test_auxiliary_classifier_adds_class_logits_and_the_class_term_finds_them():
    kw = dict(resolution=32, latent_dim=32, width=1 / 16, num_classes=2)
    torch.manual_seed(0)
    plain, with_head = (
        Discriminator(MSGGANConfig(**kw)),
        Discriminator(MSGGANConfig(**kw, d_classifier=True)),
    )
    missing, unexpected = with_head.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing == ["output.classify.weight", "output.classify.bias"]
    G = Generator(MSGGANConfig(**kw))
    labels = torch.tensor([0, 1, 1, 0])
    fakes = G(torch.randn(4, 32), labels)
    score, logits = with_head(fakes, labels, logits=True)
    # the score is the projection discriminator's, unchanged by the head
    assert torch.equal(score, plain(fakes, labels)) and logits.shape == (4, 2)
    with pytest.raises(ValueError, match="no classifier"):
        plain(fakes, labels, logits=True)
    with pytest.raises(ValueError, match="conditional"):
        MSGGANConfig(resolution=32, d_classifier=True)
    # the loss looks the logits up by the pyramid scored, also through a detached copy (R1)
    term = ClassTerm(weight=2.0)
    term.keep([x.detach() for x in fakes], logits)
    loss, stats = term.loss(fakes, labels, share=0.5)
    assert torch.allclose(loss, F.cross_entropy(logits, labels))
    assert stats["accuracy"] == (logits.argmax(1) == labels).float().mean().item()
    with pytest.raises(RuntimeError, match="did not score"):
        term.loss(fakes, labels)  # forgotten once used: a stale logit is never reused


@pytest.mark.parametrize("conditional", [False, True])
def test_channels_last_training_layout_computes_what_nchw_does(conditional):
    """train-gan runs G, D and the reals in channels_last (TRAIN_LAYOUT, for speed): the
    losses, the penalty and every weight gradient match NCHW.

    In float64, so that the layout is all that differs: in float32 the loss matches to
    rounding, but these untrained models amplify rounding in places (a pixel norm of
    near-zero features, gradient sums that nearly cancel), and on an AVX2 machine fp32
    channels_last and fp32 NCHW gradients differed by up to 0.5% of their scale while both
    matched a float64 NCHW reference to 1e-6 given the same upstream gradients."""
    from synthbreast.train.gan import TRAIN_LAYOUT

    config = MSGGANConfig(
        resolution=32, latent_dim=32, width=1 / 16, g_padding="reflect", g_upsample="bilinear",
        g_noise="all", num_classes=2 if conditional else 0,
    )  # fmt: skip
    _, G, D = tiny_models(config)
    G_cl = Generator(config).to(memory_format=TRAIN_LAYOUT)
    D_cl = Discriminator(config).to(memory_format=TRAIN_LAYOUT)
    G_cl.load_state_dict(G.state_dict())
    D_cl.load_state_dict(D.state_dict())
    for noise in G.modules():  # noise weights start at 0: make the noise path count
        if isinstance(noise, NoiseInjection):
            noise.weight.data.fill_(0.3)
    G_cl.load_state_dict(G.state_dict())
    assert G_cl.blocks[0].conv1.weight.is_contiguous(memory_format=TRAIN_LAYOUT)

    torch.manual_seed(1)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    z, alpha = torch.randn(4, 32), torch.rand(4)
    labels = torch.tensor([0, 1, 0, 1]) if conditional else None

    def step(G, D, real):
        torch.manual_seed(2)  # the same per-pixel noise on both sides
        real_in = image_pyramid(real, config.scales())
        fake = G(z, labels)
        loss, _ = discriminator_loss(lambda s: D(s, labels), real_in, fake, alpha=alpha)
        loss.backward()
        return loss, [p.grad for p in (*G.parameters(), *D.parameters())]

    loss, _ = step(G, D, real)
    loss_cl, _ = step(G_cl, D_cl, real.contiguous(memory_format=TRAIN_LAYOUT))
    torch.testing.assert_close(loss_cl, loss, rtol=1e-4, atol=1e-5)  # float32, as trained

    for model in (G, D, G_cl, D_cl):
        model.zero_grad(set_to_none=True)
        model.double()
    z, alpha = z.double(), alpha.double()
    real = real.double()
    assert G_cl.blocks[0].conv1.weight.is_contiguous(memory_format=TRAIN_LAYOUT)
    loss, grads = step(G, D, real)
    loss_cl, grads_cl = step(G_cl, D_cl, real.contiguous(memory_format=TRAIN_LAYOUT))
    torch.testing.assert_close(loss_cl, loss, rtol=1e-10, atol=1e-12)
    assert len(grads) == len(grads_cl) and all(g is not None for g in grads)
    for g, g_cl in zip(grads, grads_cl, strict=True):
        torch.testing.assert_close(g_cl, g, rtol=1e-7, atol=1e-10)
