"""Backbones, heads and discriminators.

- ``lenet``: the DANN paper's MNIST feature extractor (conv5x5-32, pool, conv5x5-48, pool -> 768-d),
  exactly, without BatchNorm. Head: the paper's 100-100-C MLP. It is the default because BatchNorm
  over a mixed source+target batch made DANN unstable on mnist5k -> ucidigits (2000 steps: DANN
  59.9/63.2/62.8% with BN vs 79.6/77.7% without; source-only 65.4/72.1/68.8 vs 71.7/69.9).
- ``lenet_bn``: the same with BatchNorm after each conv (for BN-based methods such as AdaBN).
- ``resnet18`` / ``resnet50``: torchvision ResNets; ImageNet weights are loaded ONLY from a local
  file (``--pretrained PATH`` or torch's hub cache); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from dalab.utils import DalabError


class LeNet(nn.Module):
    """DANN paper (Ganin et al., 2016, Sec. 5.2) MNIST feature extractor, plus BatchNorm."""

    def __init__(self, in_channels: int = 3, bn: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.body = nn.Sequential(
            # max-pool before ReLU: the same function as ReLU -> pool (ReLU is monotone), with the
            # ReLU on 4x fewer values; parameter names are unchanged
            nn.Conv2d(in_channels, 32, 5), norm(32), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(32, 48, 5), norm(48), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.out_dim = 48 * 4 * 4

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


# torchvision's file names for the ImageNet weights, as they sit in torch's hub cache.
RESNET_WEIGHT_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}


def find_local_weights(arch: str, path: str | os.PathLike | None) -> Path:
    """The local ImageNet weight file for ``arch``: ``path`` if given, else torch's hub cache."""
    if path not in (None, "", "imagenet"):
        p = Path(path)
        if not p.is_file():
            raise DalabError(f"pretrained weights file {p} not found; pass an existing .pth file "
                             f"(torchvision's {RESNET_WEIGHT_FILES.get(arch, arch + '.pth')})")
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints" / RESNET_WEIGHT_FILES[arch]
    if not hub.is_file():
        raise DalabError(f"ImageNet weights for {arch} not found at {hub}; copy torchvision's "
                         f"{RESNET_WEIGHT_FILES[arch]} there or pass --pretrained PATH (dalab never downloads)")
    return hub


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its fc layer; output is the pooled feature vector."""

    def __init__(self, arch: str = "resnet18", pretrained: str | None = None):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            file = find_local_weights(arch, pretrained)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
                net.load_state_dict(state)
            except Exception as e:  # corrupt file, wrong architecture
                raise DalabError(f"could not load {arch} weights from {file}: {str(e).splitlines()[0]}; "
                                 f"use torchvision's {RESNET_WEIGHT_FILES[arch]}") from None
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.body = net

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


# input side each backbone takes (None: any size >= 32 after resizing, e.g. ResNets' global pooling)
BACKBONE_INPUT: dict[str, int | None] = {"lenet": 28, "lenet_bn": 28, "resnet18": None, "resnet50": None}
# the smallest input a backbone is meant for (ResNets downsample 32x): smaller ones run, with a warning
BACKBONE_MIN_SIZE: dict[str, int] = {"resnet18": 64, "resnet50": 64}
# what a run can be checked against before any network is built (tests build each to confirm):
# whether the backbone has BatchNorm layers, and how many blocks backbone_blocks() finds in it
BACKBONE_BATCHNORM: dict[str, bool] = {"lenet": False, "lenet_bn": True, "resnet18": True, "resnet50": True}
BACKBONE_BLOCKS: dict[str, int] = {"lenet": 2, "lenet_bn": 2, "resnet18": 5, "resnet50": 5}

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "lenet": lambda pretrained=None: LeNet(bn=False),    # the DANN paper's exact architecture
    "lenet_bn": lambda pretrained=None: LeNet(bn=True),  # + BatchNorm after each conv
    "resnet18": lambda pretrained=None: ResNetBackbone("resnet18", pretrained),
    "resnet50": lambda pretrained=None: ResNetBackbone("resnet50", pretrained),
}


def mlp(dims: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ReLU (and optional dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """backbone -> head. ``features`` is the backbone output (what discriminators see)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build_classifier(backbone: str, num_classes: int, pretrained: str | None = None) -> Classifier:
    if backbone not in BACKBONES:
        raise DalabError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    bb = BACKBONES[backbone](pretrained=pretrained)
    # the DANN paper's MNIST label predictor is 100-100-C; ResNets get a 256-d bottleneck (as TLlib).
    hidden = [100, 100] if backbone.startswith("lenet") else [256]
    return Classifier(bb, mlp([bb.out_dim, *hidden, num_classes]))


def domain_discriminator(in_dim: int, hidden: int = 100, depth: int = 1, bn: bool = False,
                         out_dim: int = 1) -> nn.Sequential:
    """Domain classifier: ``depth`` hidden ReLU layers of width ``hidden`` (optionally with
    BatchNorm) -> one logit (source = 1), or ``out_dim`` logits (one per domain of several).
    The DANN paper's MNIST one is 768-100-1 (depth 1)."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden] * depth
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if bn else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1d/2d/3d) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(module: nn.Module) -> bool:
    return bool(batchnorm_layers(module))


def discriminator_bn(setting: str, backbone: nn.Module) -> bool:
    """A discriminator's ``disc_bn`` hparam: ``auto`` = BatchNorm exactly when the backbone has it
    (the BN-free paper LeNet keeps the paper's plain discriminator; BN backbones get TLlib's)."""
    return setting == "true" or (setting == "auto" and has_batchnorm(backbone))


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages, input to output (what "fine-tune the last k blocks" counts):
    LeNet's two conv stages; a ResNet's stem and its four residual stages."""
    if isinstance(backbone, LeNet):
        return [backbone.body[0:4], backbone.body[4:8]]
    if isinstance(backbone, ResNetBackbone):
        b = backbone.body
        return [nn.ModuleList([b.conv1, b.bn1]), b.layer1, b.layer2, b.layer3, b.layer4]
    raise DalabError(f"no block structure known for backbone {type(backbone).__name__}")


def fresh_copy(module: nn.Module) -> nn.Module:
    """A module of the same architecture with newly initialised weights (e.g. MDD's second head)."""
    import copy

    new = copy.deepcopy(module)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return new


def freeze(module: nn.Module) -> None:
    """No gradients for ``module``'s weights. (Its BatchNorm statistics are kept by the method
    holding it in eval mode; see ``Method.train`` overrides.)"""
    for p in module.parameters():
        p.requires_grad_(False)
