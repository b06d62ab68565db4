"""Backbones that return the multi-scale feature maps C2–C5 (strides 4, 8, 16, 32).

Every backbone normalises its own input, so models take RGB in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..registry import ConfigError, Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ResNetBackbone(nn.Module):
    """torchvision ResNet cut into stem, layer1..layer4; returns [C2, C3, C4, C5]."""

    def __init__(self, depth: int = 18, pretrained: bool | str = False, weights_path: str | None = None,
                 last_stride: int = 2):
        super().__init__()
        import torchvision

        builder = getattr(torchvision.models, f"resnet{depth}", None)
        if builder is None:
            raise ConfigError(f"unknown ResNet depth {depth}; use 18, 34, 50, 101 or 152")
        weights = None
        if pretrained and weights_path is None:
            name = pretrained if isinstance(pretrained, str) else "DEFAULT"
            weights = torchvision.models.get_model_weights(builder).__members__.get(name)
            if weights is None:
                raise ConfigError(f"resnet{depth} has no torchvision weights named '{name}'")
        try:
            net = builder(weights=weights)
        except Exception as exc:  # URLError, HTTPError, ssl errors: all mean "not reachable"
            raise RuntimeError(
                f"could not download torchvision weights {weights} ({exc}). This machine may be "
                "offline: set backbone.weights_path to a local .pth file, or pretrained: false"
            ) from None
        if weights_path is not None:
            load_state_dict_file(net, weights_path)
        if last_stride == 1:  # MGN / re-id trick: keep twice the spatial resolution in C5
            block = net.layer4[0]
            strided_conv = block.conv2 if depth >= 50 else block.conv1  # where torchvision strides
            strided_conv.stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        expansion = 4 if depth >= 50 else 1
        self.channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self.normalize(images))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def load_state_dict_file(module: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing and len(missing) == len(module.state_dict()):
        raise ConfigError(f"{path}: no key matches the model (e.g. file has {next(iter(state))!r})")


@BACKBONES.register("resnet18")
def resnet18(pretrained: bool | str = False, weights_path: str | None = None, last_stride: int = 2) -> nn.Module:
    return ResNetBackbone(18, pretrained, weights_path, last_stride)


@BACKBONES.register("resnet50")
def resnet50(pretrained: bool | str = False, weights_path: str | None = None, last_stride: int = 2) -> nn.Module:
    return ResNetBackbone(50, pretrained, weights_path, last_stride)
