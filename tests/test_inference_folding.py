"""BatchNorms folded into their convolutions for embedding: same embeddings, the model untouched,
and a model whose registration order is not its forward order is left alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fashion_retrieval.models.base import RetrievalModel
from fashion_retrieval.models.global_net import GlobalNet
from fashion_retrieval.models.inference import fold_batch_norms, folded_for_inference
from fashion_retrieval.models.mmfl_net import MMFLNet


def _with_running_statistics(model: nn.Module, size=(64, 48)) -> nn.Module:
    model.train()
    with torch.no_grad():  # statistics away from their initial 0 / 1, so a wrong fold shows
        model(torch.rand(4, 3, *size) * 3)
    return model.eval()


@pytest.mark.parametrize("build", [
    lambda: GlobalNet(num_items=5, backbone="efficientnet_lite0", embedding_dim=16),
    lambda: GlobalNet(num_items=5, backbone="resnet18", embedding_dim=16),
    lambda: MMFLNet(num_items=5, backbone="resnet18"),
])
def test_folded_copy_embeds_the_same_and_leaves_the_model_alone(build):
    torch.manual_seed(0)
    model = _with_running_statistics(build())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.train()  # folded_for_inference must give the caller its mode back
    folded = folded_for_inference(model, (64, 48))
    assert folded is not model and model.training
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == norms
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) < norms // 4  # most folded
    model.eval()
    images = torch.rand(3, 3, 64, 48)
    with torch.inference_mode():
        assert torch.allclose(folded.embed(images), model.embed(images), atol=1e-5, rtol=1e-4)


class NormBeforeConv(RetrievalModel):
    """Registers conv then norm, but normalises the input before convolving: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.feat_dim = 3

    def forward(self, images, attribute=None):
        return {"embedding": self.conv(self.norm(images)).mean(dim=(2, 3))}


def test_a_fold_that_changes_the_embeddings_is_not_used():
    torch.manual_seed(0)
    model = _with_running_statistics(NormBeforeConv(), (16, 16))
    assert fold_batch_norms(NormBeforeConv().eval()) == 1  # the pair is found by order...
    assert folded_for_inference(model, (16, 16)) is model  # ... and the check rejects it
