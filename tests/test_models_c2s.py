"""Consumer-to-shop models (global_net, mmfl_net) and their parts: output contract, gradient
flow into every branch, ablation switches, config errors, and a tiny model that learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fashion_retrieval.models import MODELS
from fashion_retrieval.models.fusion import SemanticSpatialFusion
from fashion_retrieval.models.heads import BNNeck, MultiLabelAttributeHead
from fashion_retrieval.models.mmfl_net import stripe_bounds
from fashion_retrieval.models.pooling import GeM, build_pooling
from fashion_retrieval.registry import ConfigError
from conftest import TEST_THREADS

torch.set_num_threads(TEST_THREADS)

ATTRIBUTE_SIZES = [3, 4]  # V_total = 7
SMALL_MMFL = {"backbone": "resnet18", "fusion_channels": 32, "embedding_dim": 16}


def build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS.build(name, **{"num_items": 5, **kwargs})


@pytest.mark.parametrize("size", [(128, 96), (256, 192)])
def test_global_net_outputs(size: tuple[int, int]) -> None:
    model = build("global_net", attribute_sizes=ATTRIBUTE_SIZES, embedding_dim=64)
    images = torch.rand(2, 3, *size)
    out = model.train()(images)
    assert set(out) == {"embedding", "features", "logits", "attr_logits"}
    assert out["embedding"].shape == out["features"].shape == (2, model.feat_dim) == (2, 64)
    assert out["logits"].shape == (2, 5)
    assert out["attr_logits"].shape == (2, sum(ATTRIBUTE_SIZES))
    with torch.no_grad():
        assert set(model.eval()(images)) == {"embedding"}
    assert model.attribute_conditioned is False


def test_global_net_without_reduction_or_attributes() -> None:
    model = build("global_net", embedding_dim=None, attribute_sizes=[], pooling="avg")
    assert model.feat_dim == 512  # resnet18's C5 width, no reduction layer
    assert "attr_logits" not in model.train()(torch.rand(2, 3, 64, 48))


@pytest.mark.parametrize("size", [(128, 96), (256, 192)])
def test_mmfl_net_outputs(size: tuple[int, int]) -> None:
    model = build("mmfl_net", attribute_sizes=ATTRIBUTE_SIZES, **SMALL_MMFL)
    images = torch.rand(2, 3, *size)
    out = model.train()(images)
    assert set(out) == {"embedding", "features", "branch_features", "branch_logits", "logits", "attr_logits"}
    assert model.branch_names == ["global", "part2", "part2_stripe0", "part2_stripe1",
                                  "part3", "part3_stripe0", "part3_stripe1", "part3_stripe2", "local"]
    assert model.feat_dim == 9 * 16
    assert out["embedding"].shape == (2, model.feat_dim)
    # Metric losses see each branch's whole-map feature, not the stripes (MGN).
    assert model.metric_branch_names == ["global", "part2", "part3", "local"]
    assert out["features"].shape == (2, model.features_dim) == (2, 4 * 16)
    assert [f.shape for f in out["branch_features"]] == [(2, 16)] * 4
    assert [lg.shape for lg in out["branch_logits"]] == [(2, 5)] * 9
    assert out["logits"] is out["branch_logits"][0]  # "logits" is the global branch's
    assert out["attr_logits"].shape == (2, 7)
    # The concatenations keep the branch order, so slices map to metric_branch_names.
    torch.testing.assert_close(out["features"][:, 16:32], out["branch_features"][1])
    with torch.no_grad():
        assert set(model.eval()(images)) == {"embedding"}


@pytest.mark.parametrize("metric_on_stripes", [False, True])
def test_triplet_losses_reach_the_stripes_only_when_asked(metric_on_stripes: bool) -> None:
    # The recipes' metric terms: improved trihard on "features", trihard on every "branch_features".
    from fashion_retrieval.losses.objective import build_objective

    model = build("mmfl_net", metric_on_stripes=metric_on_stripes, **SMALL_MMFL).train()
    out = model(torch.rand(4, 3, 64, 48))
    objective = build_objective([{"name": "improved_trihard", "margin": 0.3},
                                 {"name": "trihard", "label": "branches", "input": "branch_features", "margin": 0.3}])
    total, _ = objective(out, {"item": torch.tensor([0, 0, 1, 1])})
    total.backward()

    def touched(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    stripes = [neck for part in model.part_branches for neck in part.necks[1:]]
    assert len(stripes) == 5
    assert touched(model.global_neck) and all(touched(part.necks[0]) for part in model.part_branches)
    assert touched(model.local_branch.neck)
    assert [touched(neck) for neck in stripes] == [metric_on_stripes] * 5
    expected = model.branch_names if metric_on_stripes else ["global", "part2", "part3", "local"]
    assert model.metric_branch_names == expected and len(out["branch_features"]) == len(expected)


def test_mmfl_net_eval_embedding_does_not_depend_on_the_batch() -> None:
    model = build("mmfl_net", **SMALL_MMFL).eval()
    images = torch.rand(3, 3, 100, 70)  # odd sizes: levels halve rounding up
    with torch.no_grad():
        together = model(images)["embedding"]
        alone = model(images[1:2])["embedding"]
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_learnable_parameter() -> None:
    """Random weights on every output: a plain sum would be invariant to the BatchNorms (the
    post-BN embeddings always sum to the same) and hide missing gradients."""
    model = build("mmfl_net", attribute_sizes=ATTRIBUTE_SIZES, **SMALL_MMFL).train()
    out = model(torch.rand(4, 3, 64, 48))
    generator = torch.Generator().manual_seed(1)
    tensors = [out["features"], out["embedding"], out["logits"], out["attr_logits"],
               *out["branch_features"], *out["branch_logits"]]
    loss = sum((t * torch.randn(t.shape, generator=generator)).sum() for t in tensors)
    loss.backward()
    learnable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    dead = [name for name, p in learnable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    for part in ("backbone.stem", "backbone.stages.0", "backbone.stages.3", "fusion.top_down", "fusion.downsample",
                 "fusion.aggregate", "global_pool.p", "global_neck", "part_branches.0", "part_branches.1",
                 "local_branch.pool.score", "attribute_head"):
        assert any(name.startswith(part) for name in learnable), part
    # BNNeck's frozen BN bias is the only parameter that must not learn.
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(name.endswith("bn.bias") for name in frozen)


def test_ablation_switches_change_the_embedding_width() -> None:
    def width(**switches) -> tuple[int, int]:
        model = build("mmfl_net", **SMALL_MMFL, **switches).eval()
        with torch.no_grad():
            embedding = model(torch.rand(1, 3, 64, 48))["embedding"]
        assert embedding.shape[1] == model.feat_dim == 16 * len(model.branch_names)
        return model.feat_dim

    assert width() == 16 * (1 + 3 + 4 + 1)
    assert width(use_local_branch=False) == 16 * (1 + 3 + 4)
    assert width(use_part_branches=False) == 16 * 2
    assert width(use_part_branches=False, use_local_branch=False) == 16
    assert width(part_stripes=(2,)) == 16 * (1 + 3 + 1)
    assert width(part_stripes=(1, 2, 4), part_level=3, local_level=2) == 16 * (1 + 2 + 3 + 5 + 1)


def test_model_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown key 'fusion_chanels'.*did you mean 'fusion_channels'"):
        MODELS.build("mmfl_net", num_items=3, backbone="resnet18", fusion_chanels=64)
    with pytest.raises(ConfigError, match="unknown model 'mmfl_nett'.*did you mean 'mmfl_net'"):
        MODELS.build("mmfl_nett", num_items=3)
    with pytest.raises(ConfigError, match="part_level must be one of"):
        MODELS.build("mmfl_net", num_items=3, backbone="resnet18", part_level=6)
    with pytest.raises(ConfigError, match="part_stripes must be positive"):
        MODELS.build("mmfl_net", num_items=3, backbone="resnet18", part_stripes=(0, 2))
    with pytest.raises(ConfigError, match="unknown pooling 'mean'"):
        MODELS.build("global_net", num_items=3, pooling="mean")
    with pytest.raises(ConfigError, match="every attribute needs at least one value"):
        MODELS.build("global_net", num_items=3, attribute_sizes=[2, 0])


def test_tiny_global_net_overfits_a_fixed_batch() -> None:
    """32 random images of 8 ids: ID cross-entropy must fall 10× within 60 Adam steps (it takes
    about 10), i.e. backbone, pooling, BNNeck and classifier are wired so that the model learns."""
    model = build("global_net", num_items=8, backbone="resnet18").train()
    images = torch.rand(32, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 8
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(images)["logits"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[0] == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=0.1)  # near-uniform start
    assert losses[-1] < losses[0] / 10, losses


# ---- parts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,stripes", [(16, 2), (16, 3), (5, 3), (2, 3), (1, 2), (24, 4)])
def test_stripes_cover_every_row_and_are_never_empty(height: int, stripes: int) -> None:
    bounds = stripe_bounds(height, stripes)
    assert len(bounds) == stripes
    assert bounds[0][0] == 0 and bounds[-1][1] == height
    assert all(0 <= top < bottom <= height for top, bottom in bounds)
    assert all(next_top <= bottom for (_, bottom), (next_top, _) in zip(bounds, bounds[1:]))  # no gap
    if height % stripes == 0:
        assert bounds == [(i * height // stripes, (i + 1) * height // stripes) for i in range(stripes)]


def test_gem_spans_average_to_max_pooling_and_learns_p() -> None:
    x = torch.rand(2, 3, 5, 4) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), build_pooling("avg")(x))
    # Power mean bounds: max · N^(-1/p) <= GeM_p <= max over the N = 20 cells.
    high_p, maximum = GeM(p=80.0)(x), build_pooling("max")(x)
    assert (high_p <= maximum + 1e-6).all() and (high_p >= maximum * 20 ** (-1 / 80) - 1e-6).all()
    assert (build_pooling("avg")(x) < GeM(p=3.0)(x)).all() and (GeM(p=3.0)(x) < maximum).all()
    gem = build_pooling("gem")
    assert gem.p.item() == 3.0
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0
    with pytest.raises(ConfigError, match="GeM p must be positive"):
        GeM(p=0.0)


def test_bnneck_separates_metric_and_classification_spaces() -> None:
    neck = BNNeck(in_dim=12, embedding_dim=6, num_classes=4).train()
    out = neck(torch.randn(8, 12))
    assert out.features.shape == out.embedding.shape == (8, 6)
    assert out.logits.shape == (8, 4)
    assert not neck.bn.bias.requires_grad and neck.classifier.bias is None
    torch.testing.assert_close(out.embedding.mean(0), torch.zeros(6), atol=1e-5, rtol=0)  # BN in train mode
    assert neck(torch.randn(8, 12), with_logits=False).logits is None
    assert isinstance(BNNeck(6, 6).reduce, torch.nn.Identity)
    assert isinstance(BNNeck(6, 6, reduce=True).reduce, torch.nn.Linear)
    assert MultiLabelAttributeHead(6, [2, 5])(out.embedding).shape == (8, 7)


def test_fusion_levels_keep_resolution_and_share_width() -> None:
    channels = [8, 16, 32, 64]
    inputs = [torch.rand(2, c, 32 // s, 24 // s) for c, s in zip(channels, [1, 2, 4, 4])]  # last_stride=1
    fusion = SemanticSpatialFusion(channels, 16, strides=(4, 8, 16, 16))
    outputs = fusion(inputs)
    assert [o.shape for o in outputs] == [(2, 16, *i.shape[-2:]) for i in inputs]
    with pytest.raises(ConfigError, match="same or double stride"):
        SemanticSpatialFusion(channels, 16, strides=(4, 16, 32, 64))


@pytest.mark.parametrize("name,kwargs", [("mmfl_net", SMALL_MMFL), ("global_net", {"backbone": "efficientnet_lite0", "pretrained": True})])
def test_onnx_export_matches_pytorch(name: str, kwargs: dict, tmp_path) -> None:
    """The exported graph (what ``export onnx`` writes) must compute the same embedding, for
    another batch size than the traced one and at sizes where stripes and "SAME" padding are
    uneven: the tracer records size arithmetic, so a Python-only trick there breaks silently."""
    import warnings

    import onnxruntime

    model = build(name, **kwargs).eval()

    class EmbeddingOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model(images)["embedding"]

    wrapper = EmbeddingOnly().eval()
    images = torch.rand(3, 3, 136, 88, generator=torch.Generator().manual_seed(0))  # N4 9×6: 2 and 3 stripes uneven
    path = tmp_path / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on size arithmetic, constant for a fixed input size
        torch.onnx.export(wrapper, (images[:2],), str(path), input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=18,
                          dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = wrapper(images)
    got = torch.from_numpy(session.run(["embedding"], {"images": images.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=1e-4)
