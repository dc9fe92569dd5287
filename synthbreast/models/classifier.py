"""Transfer-learning classifiers: a torchvision ResNet with a new 2-class head (the paper: ResNet18
pretrained on ImageNet, everything frozen but the new fc).

The modules here are plain torchvision models, so a saved state dict rebuilds with
`torchvision.models.resnet18(num_classes=2)` and `load_state_dict`. The one function that reads
a file is `load_imagenet_state`, at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights

from synthbreast.errors import UserError

NUM_CLASSES = 2
MODES = ("frozen", "finetune")
WEIGHTS = ("imagenet", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., torchvision.models.ResNet]  # torchvision.models.<name>
    imagenet: object  # the torchvision weights enum member (for its file name only)
    features: int  # width of the pooled features, the fc's input


# ResNet50: IMAGENET1K_V1, the weights `pretrained=True` gave and most transfer papers used.
BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(torchvision.models.resnet18, ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50": Backbone(torchvision.models.resnet50, ResNet50_Weights.IMAGENET1K_V1, 2048),
}


def backbone_spec(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"--backbone {name!r} unknown; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_classifier(
    backbone: str, imagenet_state: dict[str, torch.Tensor] | None = None
) -> torchvision.models.ResNet:
    """A ResNet with a new 2-class fc. With `imagenet_state` the backbone takes those weights;
    the new fc is always freshly initialised from torch's global RNG (seed before calling)."""
    spec = backbone_spec(backbone)
    model = spec.build(weights=None)  # 1000-class head, so the ImageNet state dict fits
    if imagenet_state is not None:
        model.load_state_dict(imagenet_state)
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    return model


def set_trainable(model: torchvision.models.ResNet, mode: str) -> list[nn.Parameter]:
    """frozen: only fc learns; finetune: everything does. Returns the parameters to optimise."""
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} unknown; choose from {', '.join(MODES)}")
    frozen = mode == "frozen"
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not frozen or name.startswith("fc."))
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: torchvision.models.ResNet, mode: str) -> None:
    """model.train(), except that a frozen backbone stays in eval mode: its BatchNorm layers
    keep ImageNet's running statistics instead of updating them from our batches."""
    model.train()
    if mode == "frozen":
        model.eval()
        model.fc.train()


def backbone_features(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """The pooled features the fc sees: torchvision's ResNet.forward without the fc."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def backbone_digest(model: torchvision.models.ResNet) -> str:
    """sha256 of the backbone's weights and buffers (not the fc): what decides its features."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("fc."):
            continue
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


# --- the one function with file I/O ----------------------------------------------------------


def imagenet_file_name(backbone: str) -> str:
    """torchvision's file name of the ImageNet weights, e.g. resnet18-f37072fd.pth."""
    return backbone_spec(backbone).imagenet.url.rsplit("/", 1)[-1]


def imagenet_weights_path(backbone: str, weights_path: str | Path | None = None) -> Path:
    """The given file, else the torch hub cache's (where torchvision would have put it)."""
    if weights_path is not None:
        return Path(weights_path)
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_file_name(backbone)


def load_imagenet_state(
    backbone: str, weights_path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """ImageNet weights of a backbone from a file, never from the network; never unpickled."""
    path = imagenet_weights_path(backbone, weights_path)
    name = imagenet_file_name(backbone)
    if not path.is_file():
        where = "--weights-path" if weights_path is not None else "the torch hub cache"
        raise UserError(
            f"ImageNet weights for {backbone} not found at {path} ({where}). Place torchvision's "
            f"{name} (from {backbone_spec(backbone).imagenet.url}) there, or pass "
            f"--weights-path FILE, or train from random weights with --weights none"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zips: all say "not a weights file"
        raise UserError(f"{path} is not a readable torch weights file ({err})") from err
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise UserError(f"{path} is not a {backbone} state dict (expected torchvision's {name})")
    probe = BACKBONES[backbone].build(weights=None)
    missing = set(probe.state_dict()) ^ set(state)
    if missing:
        listed = ", ".join(sorted(missing)[:5])
        raise UserError(f"{path} does not fit {backbone} (keys differ: {listed}); expected {name}")
    return state
