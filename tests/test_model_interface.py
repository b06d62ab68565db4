"""The model interface (models/base.py) and the backbone section (config.BackboneConfig):
every model is a RetrievalModel whose ``embed`` is the one inference forward, backbone options
reach every model, and recipes, command lines and run directories of the old flat spelling
(``model.kwargs.backbone=...``, ``model.kwargs.pretrained=...``) build the same model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fashion_retrieval.config import ConfigError, load_config, nest_backbone_options
from fashion_retrieval.engine.checkpoint import load_for_inference, save_for_inference
from fashion_retrieval.models import MODELS, build_model
from fashion_retrieval.models.base import RetrievalModel
from fashion_retrieval.registry import Registry
from conftest import TEST_THREADS

SIZES = [3, 2]
SMALL = {
    "global_net": {"num_items": 4, "embedding_dim": 16},
    "mmfl_net": {"num_items": 4, "fusion_channels": 16, "embedding_dim": 8},
    "asen": {"attribute_sizes": SIZES, "embedding_dim": 16, "attr_dim": 8, "joint_dim": 8},
    "m3_net": {"attribute_sizes": SIZES, "embedding_dim": 16, "attr_dim": 8, "joint_dim": 8},
    "attribute_classifier": {"attribute_sizes": SIZES},
}
OLD_RECIPE = """name: old
data: {format: viton, root: viton}
model:
  name: global_net
  kwargs: {backbone: resnet50, pretrained: true, last_stride: 2, embedding_dim: 256}
loss: {terms: [{name: cross_entropy}]}
"""
NEW_RECIPE = """name: new
data: {format: viton, root: viton}
model:
  name: global_net
  backbone: {name: resnet50, pretrained: true, last_stride: 2}
  kwargs: {embedding_dim: 256}
loss: {terms: [{name: cross_entropy}]}
"""


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(SMALL))
def test_every_model_embeds_through_the_base_class(name: str) -> None:
    model = MODELS.build(name, backbone="resnet18", **SMALL[name]).eval()
    assert isinstance(model, RetrievalModel)
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        if model.attribute_conditioned:
            with pytest.raises(ValueError, match="attribute-conditioned: pass attribute"):
                model.embed(images)
            embedding = model.embed(images, 1)
            assert torch.equal(embedding, model(images, attribute=torch.tensor([1, 1]))["embedding"])
        else:
            embedding = model.embed(images, attribute=1)  # ignored: one space for every attribute
            assert torch.equal(embedding, model(images)["embedding"])
    assert embedding.shape == (2, model.feat_dim)


def test_models_registry_refuses_what_is_not_a_retrieval_model() -> None:
    registry: Registry = Registry("model", expects=RetrievalModel)
    registry.register("plain")(lambda: nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="model 'plain' built a Linear, not a RetrievalModel"):
        registry.build("plain")


def test_old_and_new_recipes_and_old_overrides_build_the_same_model(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text(OLD_RECIPE)
    (tmp_path / "new.yaml").write_text(NEW_RECIPE)
    old, new = load_config(tmp_path / "old.yaml"), load_config(tmp_path / "new.yaml")
    expected = {"embedding_dim": 256, "backbone": {"name": "resnet50", "pretrained": True, "last_stride": 2}}
    assert old.model.build_kwargs() == new.model.build_kwargs() == expected
    # scripts/results_cpu.sh's overrides on a recipe in the new form: the name and initialisation
    # change, the section's other options stay
    overrides = ["model.kwargs.backbone=efficientnet_lite0", "model.kwargs.pretrained=true"]
    for recipe in ("old.yaml", "new.yaml"):
        built = load_config(tmp_path / recipe, overrides).model.build_kwargs()
        assert built["backbone"] == {"name": "efficientnet_lite0", "pretrained": True, "last_stride": 2}
    nested = load_config(tmp_path / "new.yaml", ["model.backbone.name=efficientnet_lite0"]).model.build_kwargs()
    assert nested == load_config(tmp_path / "new.yaml", overrides[:1]).model.build_kwargs()


def test_bad_backbone_options_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "new.yaml").write_text(NEW_RECIPE)
    with pytest.raises(ConfigError, match=r"new.yaml: model.backbone.last_strid: unknown key \(did you mean 'last_stride'"):
        load_config(tmp_path / "new.yaml", ["model.backbone.last_strid=1"])
    with pytest.raises(ConfigError, match=r"new.yaml: model: .*backbone.last_stride: Input should be 1 or 2"):
        load_config(tmp_path / "new.yaml", ["model.kwargs.last_stride=3"])
    with pytest.raises(ConfigError, match="unknown key 'drop_connect_rate' for backbone 'resnet18'"):
        MODELS.build("global_net", num_items=2, backbone={"name": "resnet18", "drop_connect_rate": 0.1})
    assert nest_backbone_options({"embedding_dim": 8}) == {"embedding_dim": 8}  # the model's default backbone


def test_backbone_options_reach_every_model() -> None:
    # drop-connect was a keyword of the EfficientNet builder no model passed on; ASEN and the
    # attribute models did not take last_stride at all
    section = {"name": "efficientnet_lite0", "drop_connect_rate": 0.05, "last_stride": 1}
    for name, kwargs in SMALL.items():
        model = MODELS.build(name, backbone=section, **kwargs)
        (backbone,) = model.backbones()
        rates = [m.p for m in backbone.modules() if type(m).__name__ == "StochasticDepth"]
        assert rates and max(rates) <= 0.05 and max(rates) > 0, name
        assert backbone.strides[-1] == 16, name


def test_freezing_reaches_both_backbones_of_asen_plus_plus() -> None:
    from fashion_retrieval.engine.execution import freeze_backbone_stages

    model = MODELS.build("asen", backbone="resnet18", local_branch=True, **SMALL["asen"])
    frozen = freeze_backbone_stages(model, 2)
    assert len(model.backbones()) == 2 and len(frozen) == 6  # stem + 2 stages, twice
    for branch in (model.global_branch, model.local_branch):
        assert not any(p.requires_grad for p in branch.backbone.stem.parameters())
        assert all(p.requires_grad for p in branch.backbone.stages[-1].parameters())


def test_a_run_directory_in_the_old_form_still_loads(tmp_path: Path) -> None:
    """meta.json of a checkpoint saved before model.backbone existed: flat backbone keywords,
    with a pretrained initialisation that must not be downloaded or read again."""
    model = build_model("global_net", {"backbone": "resnet18", **SMALL["global_net"]},
                        attribute_names=["colour"]).eval()
    save_for_inference(model, {"model": {"name": "global_net", "kwargs": {}}, "image_size": [64, 48],
                               "attributes": ["colour"]}, tmp_path)
    meta_path = tmp_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["kwargs"] = {"backbone": "resnet18", "pretrained": "IMAGENET1K_V1",
                               "weights_path": str(tmp_path / "gone.pth"), "last_stride": 1, **SMALL["global_net"]}
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_for_inference(tmp_path)
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(loaded.embed(images), model.embed(images))
    assert loaded.attribute_names == ("colour",)
