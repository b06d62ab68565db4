"""Every shipped recipe trains end to end on fixtures written in its dataset's own layout, and
evaluates on its benchmark where it has one.

The recipes are run as shipped except for what makes them small: a ResNet-18 from scratch, 64×48
images, two steps, small batches. Everything else (reader, options, sampler kind, model, every
loss term and its keywords, optimizer, scheduler, benchmark) is the recipe's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import write_clothing
from fixtures_official import write_counted_list, write_text
from test_evaluate import _write_styles
from test_train import write_synthetic_viton

from fashion_retrieval.config import apply_overrides, config_from_dict, load_config
from fashion_retrieval.data.readers import READERS
from fashion_retrieval.engine.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


# ---- fixtures in the official layouts, large enough to sample batches from ---------------------

def _deepfashion_c2s(root: Path) -> None:
    pairs, boxes, attributes = [], [], []
    for number in range(1, 15):
        item = f"id_{number:08d}"
        split = "test" if number > 11 else "val" if number > 9 else "train"
        folder = f"img/TOPS/Blouse/{item}"
        pairs.append(f"{folder}/comsumer_01.jpg {folder}/shop_01.jpg {item} {split}")
        boxes += [f"{folder}/comsumer_01.jpg 1 2 10 12 90 140", f"{folder}/shop_01.jpg 1 1 4 4 110 150"]
        attributes.append(f"{item} " + " ".join("1" if (number >> bit) & 1 else "-1" for bit in range(3)))
    write_counted_list(root / "Eval" / "list_eval_partition.txt",
                       "image_pair_name_1 image_pair_name_2 item_id evaluation_status", pairs)
    write_counted_list(root / "Anno" / "list_bbox_consumer2shop.txt",
                       "image_name clothes_type source_type x_1 y_1 x_2 y_2", boxes)
    write_counted_list(root / "Anno" / "list_item_consumer2shop.txt", None,
                       [f"id_{n:08d}" for n in range(1, 15)])
    write_counted_list(root / "Anno" / "list_attr_cloth.txt", "attribute_name attribute_type",
                       ["short sleeve 1", "red 2", "stripe 3"])
    write_counted_list(root / "Anno" / "list_attr_items.txt", "item_id attribute_labels", attributes)


def _deepfashion_inshop(root: Path) -> None:
    rows, boxes = [], []
    for number in range(1, 15):
        item = f"id_{number:08d}"
        folder = f"img/WOMEN/Dresses/{item}"
        for pose, view in enumerate(("1_front", "2_side", "3_back"), start=1):
            status = "train" if number <= 10 else "query" if pose == 1 else "gallery"
            rows.append(f"{folder}/01_{view}.jpg {item} {status}")
            boxes.append(f"{folder}/01_{view}.jpg 3 {pose} 8 10 110 150")
    write_counted_list(root / "Eval" / "list_eval_partition.txt", "image_name item_id evaluation_status", rows)
    write_counted_list(root / "Anno" / "list_bbox_inshop.txt",
                       "image_name clothes_type pose_type x_1 y_1 x_2 y_2", boxes)
    write_counted_list(root / "Anno" / "list_item_inshop.txt", None, [f"id_{n:08d}" for n in range(1, 15)])


def _street2shop(root: Path) -> None:
    meta = root / "meta" / "json"
    meta.mkdir(parents=True)
    box = {"left": 8, "top": 10, "width": 90, "height": 120}
    products = range(100, 112)
    (meta / "retrieval_dresses.json").write_text(json.dumps([{"photo": 1000 + p, "product": p} for p in products]))
    (meta / "train_pairs_dresses.json").write_text(
        json.dumps([{"photo": p, "product": p, "bbox": box} for p in products if p < 108]))
    (meta / "test_pairs_dresses.json").write_text(
        json.dumps([{"photo": p, "product": p, "bbox": box} for p in products if p >= 108]))


def _asen_lists(folder: Path, value_counts: list[int], meta: dict | None = None) -> None:
    """ASEN split lists: 24 train images labelled for every attribute, 6 test images."""
    rng = np.random.default_rng(0)
    train = [f"train/{n}.jpg" for n in range(24)]
    write_text(folder / "filenames_train.txt", train)
    write_text(folder / "label_train.txt", [
        f"{n} " + " ".join(f"{a} {rng.integers(0, min(count, 3))}" for a, count in enumerate(value_counts))
        for n in range(len(train))])
    write_text(folder / "filenames_test.txt", [f"test/{n}.jpg" for n in range(6)])
    write_text(folder / "query_test.txt", [f"{n} {a} {n % 2}" for n in range(3) for a in range(len(value_counts))])
    write_text(folder / "candidate_test.txt",
               [f"{n} {a} {n % 2}" for n in range(3, 6) for a in range(len(value_counts))])
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))


def _fashionai(root: Path) -> None:
    counts = {"skirt_length": 6, "collar_design": 5}
    _asen_lists(root / "split", list(counts.values()), {"ATTRIBUTES": list(counts), "ATTRIBUTES_NUM": counts})


def _darn(root: Path) -> None:
    from fashion_retrieval.data.readers.darn import DARN_ATTRIBUTES

    _asen_lists(root / "split", list(DARN_ATTRIBUTES.values()))


def _deepfashion_asen(root: Path) -> None:
    """As the other ASEN lists, plus second values of a type (DeepFashion's attributes are
    multi-label): on train images, on a query and on gallery images, so the recipes train and
    evaluate on value sets."""
    from fashion_retrieval.data.readers.darn import DEEPFASHION_ATTRIBUTES

    _asen_lists(root / "split", list(DEEPFASHION_ATTRIBUTES.values()))
    for name, lines in (("label_train.txt", [f"{n} 0 2 3 1" for n in range(0, 24, 2)]),
                        ("query_test.txt", ["0 0 1", "1 3 0"]), ("candidate_test.txt", ["4 0 1", "5 3 0"])):
        with (root / "split" / name).open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
    types = enumerate(DEEPFASHION_ATTRIBUTES.values(), 1)
    write_counted_list(root / "Anno" / "list_attr_cloth.txt", "attribute_name attribute_type",
                       [f"attribute {kind}.{n:<20} {kind}" for kind, count in types for n in range(count)])


OFFICIAL_WRITERS = {"deepfashion_c2s": _deepfashion_c2s, "deepfashion_inshop": _deepfashion_inshop,
                    "street2shop": _street2shop, "fashionai": _fashionai, "darn": _darn,
                    "deepfashion_asen": _deepfashion_asen}


def _write_images(root: Path, format_name: str, options: dict) -> None:
    """A JPEG for every image the reader lists, coloured by item so that items differ."""
    table = READERS.build(format_name, root=root, **options)
    for sample, path in zip(table, table.paths()):
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        shade = sum(map(ord, sample.item_id)) * 37 % 200
        Image.new("RGB", (120, 160), (shade, 255 - shade, (shade * 3) % 256)).save(path, quality=90)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipes-data")
    write_synthetic_viton(root / "viton", pairs=40, broken=())
    _write_styles(root / "fashion-product", count=80)
    write_clothing(root / "clothing", {"train": {"dress": 4, "pants": 4, "t-shirt": 4},
                                       "validation": {"dress": 2, "pants": 2, "t-shirt": 2}})
    return root


def _small(config_path: Path) -> list[str]:
    config = load_config(config_path)
    kind = config.data.sampler.kind
    overrides = ["data.image_size=[64,48]", "data.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=2",
                 "train.eval_every=0", "train.progress=false", "train.log_every=1", "optim.warmup_epochs=0",
                 "eval.batch_size=16", "eval.final_split=test",
                 f"data.sampler.p={3 if kind == 'attribute' else 2}", f"data.sampler.k={2 if kind == 'cross_domain' else 3}"]
    if config.model.backbone is not None or "backbone" in config.model.kwargs:
        # the old flat spelling on purpose: command lines of older runs must keep working
        overrides += ["model.kwargs.backbone=resnet18", "model.kwargs.pretrained=false"]
    return overrides


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_and_evaluates_on_fixtures(recipe: Path, data_root: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(recipe.read_text())
    config = load_config(recipe)
    data = config.data
    if data.format in OFFICIAL_WRITERS:
        dataset = data_root / data.root
        if not dataset.exists():
            OFFICIAL_WRITERS[data.format](dataset)
            _write_images(dataset, data.format, data.options)
    assert raw.get("base") or raw["name"] == recipe.stem
    small = config_from_dict(apply_overrides(config.model_dump(mode="json"), _small(recipe)))
    result = train(small, data_root, tmp_path / "run", log=lambda _: None)

    assert result.steps == 2
    logged = [row for row in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:] if row]
    assert logged and "nan" not in ",".join(logged).lower()
    assert (tmp_path / "run" / "model.safetensors").is_file()
    if config.eval.benchmark is None:
        assert result.evaluation is None
    else:
        metrics = result.evaluation["metrics"]["overall"]
        assert result.evaluation["benchmark"] == config.eval.benchmark and metrics["queries"] > 0
        assert all(0.0 <= value <= 1.0 for name, value in metrics.items() if name != "queries")


def test_the_deepfashion_recipes_fixture_has_multi_valued_types(tmp_path: Path) -> None:
    _deepfashion_asen(tmp_path)
    table = READERS.build("deepfashion_asen", root=tmp_path, split_dir="split")
    assert table.multi_label == ("texture", "part")
    several = {split: sum(len(s.attributes.get("texture", ())) > 1 for s in table.filter(split=split))
               for split in ("train", "query", "gallery")}
    assert several["train"] > 0 and several["query"] == several["gallery"] == 1


@pytest.mark.parametrize("recipe", [p for p in RECIPES if "attribute_triplet" in p.read_text()],
                         ids=lambda p: p.stem)
def test_attribute_recipes_mine_all_triplets_not_the_hardest(recipe: Path) -> None:
    # Batch-hard mining on noisy attribute labels trained ASEN below its untrained start
    # (results/cpu_asen_diagnosis/); the papers sample random triplets.
    from fashion_retrieval.losses.objective import build_term

    for term in load_config(recipe).loss.terms:
        spec = term.model_dump() if hasattr(term, "model_dump") else dict(term)
        if spec.get("name") == "attribute_triplet":
            kwargs = {k: v for k, v in {**spec, **(spec.get("kwargs") or {})}.items()
                      if k not in ("name", "weight", "label", "kwargs") and v is not None}
            assert build_term("attribute_triplet", kwargs).miner is None


def _term_kwargs(term) -> dict:
    spec = term.model_dump() if hasattr(term, "model_dump") else dict(term)
    return {k: v for k, v in {**spec, **(spec.get("kwargs") or {})}.items()
            if k not in ("name", "weight", "label", "kwargs") and v is not None}


def _tiny(kwargs: dict) -> dict:
    return {**kwargs, "backbone": "resnet18", "pretrained": False}


@pytest.mark.parametrize("recipe", [p for p in RECIPES if load_config(p).model.name == "mmfl_net"], ids=lambda p: p.stem)
def test_mmfl_recipes_put_triplets_on_whole_branches_and_scale_tau(recipe: Path) -> None:
    # MGN's placement: no metric loss on single stripes; improved trihard's tau relative to the
    # negatives (an absolute 0.1 on raw distances was active for every anchor: docs/losses.md).
    from fashion_retrieval.losses.objective import build_term
    from fashion_retrieval.models import MODELS

    config = load_config(recipe)
    model = MODELS.build("mmfl_net", num_items=3, **_tiny(config.model.kwargs))
    assert not any("_stripe" in name for name in model.metric_branch_names)
    improved = [t for t in config.loss.terms if t.name == "improved_trihard"]
    assert improved and all(build_term("improved_trihard", _term_kwargs(t)).relative for t in improved)


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem.endswith("_asen_authors")], ids=lambda p: p.stem)
def test_asen_authors_recipes_attend_over_c4_with_tanh(recipe: Path) -> None:
    from fashion_retrieval.models import MODELS

    config = load_config(recipe)
    base = load_config(CONFIGS / yaml.safe_load(recipe.read_text())["base"])
    assert config.data == base.data and config.loss == base.loss  # only the model differs
    model = MODELS.build("asen", attribute_sizes=[3, 4], **_tiny(config.model.kwargs))
    spatial = model.global_branch.attention.spatial
    assert spatial.score_tanh and spatial.image_proj.in_channels == model.global_branch.backbone.channels[2] == 256


def test_demo_runs_the_shipped_demo_recipes_and_quick_shrinks_them() -> None:
    # The demo's recipes are YAML files in configs/ (so test_recipe_trains_and_evaluates_on_fixtures
    # trains them too); --quick is overrides on top, not other recipes.
    from fashion_retrieval.engine.cli import DEMO_RECIPES, demo_recipes

    full, quick = demo_recipes(), demo_recipes(quick=True)
    assert [c.name for c in full] == [c.name for c in quick] == list(DEMO_RECIPES)
    assert all((CONFIGS / f"{name}.yaml") in RECIPES for name in DEMO_RECIPES)
    assert [c.train.max_steps_per_epoch for c in full] == [60, 60]
    assert [(c.train.epochs, c.train.max_steps_per_epoch, c.eval.final_split) for c in quick] == [(1, 3, "val")] * 2
    assert [c.model.backbone.name for c in full] == ["efficientnet_lite0"] * 2
