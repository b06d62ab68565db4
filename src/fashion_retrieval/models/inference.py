"""An inference copy of a model with every BatchNorm folded into the convolution before it.

In eval mode a BatchNorm2d is a per-channel affine map of its input, so when it directly follows
a Conv2d it can be merged into that convolution's weights and bias
(``torch.nn.utils.fusion.fuse_conv_bn_eval``): one memory-bound pass over every feature map
less. On this project's 2-core CPU that makes the embedding forward of EfficientNet-Lite0
global_net 1.25× faster on top of channels_last (docs/performance.md, "Embedding").

Which BatchNorm follows which convolution is read from the order the modules were registered
in (a Conv2d child immediately followed by a BatchNorm2d child of the same width), which is how
every backbone and head here is written (EfficientNet-Lite's ``_expand_conv``/``_bn0``…,
torchvision's ResNet ``conv1``/``bn1`` and ``Conv2dNormActivation``). Registration order is not
forward order in general, so :func:`folded_for_inference` checks the copy against the model on
a random batch and returns the model itself when they disagree.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .base import RetrievalModel


def fold_batch_norms(model: nn.Module) -> int:
    """Fold, in place, every eval-mode-foldable (Conv2d, BatchNorm2d) pair of consecutive
    children; the BatchNorm becomes an Identity. Returns how many were folded. The model must
    be in eval mode (folding uses the running statistics)."""
    folded = 0
    for module in model.modules():
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if (isinstance(conv, nn.Conv2d) and type(norm) is nn.BatchNorm2d and norm.track_running_stats
                    and norm.running_mean is not None and norm.num_features == conv.out_channels):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def folded_for_inference(model: RetrievalModel, image_size: tuple[int, int],
                         device: torch.device | str = "cpu") -> RetrievalModel:
    """An eval-mode copy of ``model`` with its BatchNorms folded, or ``model`` itself when
    nothing folds or the copy's embeddings differ from the model's on a random batch (the check
    that registration order matched forward order)."""
    folded = copy.deepcopy(model).eval()
    if fold_batch_norms(folded) == 0:
        return model
    height, width = image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, height, width, generator=generator).to(device)
    attribute = 0 if model.attribute_conditioned else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            expected, got = model.embed(images, attribute).float(), folded.embed(images, attribute).float()
    finally:
        model.train(was_training)
    scale = expected.abs().max().clamp_min(1e-6)
    return folded if bool(((expected - got).abs().max() / scale) < 1e-3) else model
