"""Recipes: typos fail naming file and dotted key, overrides and ``base:`` work, every shipped
recipe validates and names models, losses and readers that exist with keys they accept."""
from __future__ import annotations

from pathlib import Path

import pytest

from fashion_retrieval.config import ConfigError, ExperimentConfig, apply_overrides, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = """\
name: tiny
data:
  format: viton
  root: viton
  image_size: [64, 48]
  sampler: {kind: pk, p: 4, k: 2}
model: {name: global_net, kwargs: {backbone: resnet18}}
loss:
  terms:
    - {name: id_ce, weight: 1.0}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL)
    return path


def test_minimal_recipe_and_defaults(recipe: Path) -> None:
    config = load_config(recipe)
    assert isinstance(config, ExperimentConfig)
    assert config.data.image_size == (64, 48)
    assert config.optim.name == "adamw" and config.train.epochs == 10
    assert config.loss.terms[0].name == "id_ce" and config.loss.terms[0].kwargs == {}


@pytest.mark.parametrize("typo, message", [
    ("trian: {epochs: 3}\n", "trian: unknown key (did you mean 'train'?)"),
    ("optim: {lr: 0.1, wieght_decay: 0.0}\n", "optim.wieght_decay: unknown key (did you mean 'weight_decay'?)"),
])
def test_typo_names_file_and_key(recipe: Path, typo: str, message: str) -> None:
    recipe.write_text(MINIMAL + typo)
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    assert str(info.value).startswith(f"{recipe}: {message}")


def test_nested_typo_and_bad_values(recipe: Path) -> None:
    recipe.write_text(MINIMAL.replace("image_size", "imge_size"))
    with pytest.raises(ConfigError, match=r"tiny.yaml: data.imge_size: unknown key \(did you mean 'image_size'\?\)"):
        load_config(recipe)
    recipe.write_text(MINIMAL.replace("kind: pk", "kind: pk, kk: 3"))
    with pytest.raises(ConfigError, match=r"data.sampler.kk: unknown key \(did you mean 'k'\?\)"):
        load_config(recipe)
    recipe.write_text(MINIMAL)
    with pytest.raises(ConfigError, match=r"optim.name: .*'adam', 'adamw' or 'sgd'"):
        load_config(recipe, ["optim.name=lamb"])
    with pytest.raises(ConfigError, match="data.sampler.k must be even"):
        load_config(recipe, ["data.sampler.kind=cross_domain", "data.sampler.k=3"])
    recipe.write_text(MINIMAL.replace("model: {name: global_net, kwargs: {backbone: resnet18}}\n", ""))
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_config(recipe)


def test_overrides_are_parsed_as_yaml(recipe: Path) -> None:
    config = load_config(recipe, ["train.epochs=3", "data.image_size=[128, 96]", "model.kwargs.pretrained=false",
                                  "loss.terms.0.weight=0.5", "loss.terms.0.label_smoothing=0.1", "eval.benchmark=viton_c2s"])
    assert config.train.epochs == 3 and config.data.image_size == (128, 96)
    assert config.model.kwargs == {"backbone": "resnet18", "pretrained": False}
    assert config.loss.terms[0].weight == 0.5 and config.loss.terms[0].kwargs == {"label_smoothing": 0.1}
    assert config.eval.benchmark == "viton_c2s"
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(recipe, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"loss.terms.4: no list element 4"):
        load_config(recipe, ["loss.terms.4.weight=1"])
    with pytest.raises(ConfigError, match="train.epochs: Input should be a valid integer"):
        load_config(recipe, ["train.epochs=many"])


def test_base_recipe_is_merged(recipe: Path) -> None:
    child = recipe.with_name("child.yaml")
    child.write_text("base: tiny.yaml\nname: child\ntrain: {epochs: 2}\ndata: {sampler: {p: 8}}\n")
    config = load_config(child)
    assert config.name == "child" and config.train.epochs == 2
    assert config.data.sampler.p == 8 and config.data.sampler.k == 2 and config.data.root == "viton"
    loop = recipe.with_name("loop.yaml")
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_broken_yaml_names_line(recipe: Path) -> None:
    recipe.write_text(MINIMAL + "train: {epochs: [1, \n")
    with pytest.raises(ConfigError, match=r"tiny.yaml:\d+: invalid YAML"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(recipe.with_name("absent.yaml"))


def test_apply_overrides_creates_nested_keys() -> None:
    data = apply_overrides({"a": {"b": 1}}, ["a.c.d=[1, 2]", "e=text"])
    assert data == {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "text"}


RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    expected = {"fashion_product_attribute_classifier", "fashion_product_asen", "fashion_product_m3_net",
                "fashion_product_m3_net_a", "fashion_product_m3_net_c", "fashionai_asen", "fashionai_m3_net",
                "darn_asen", "darn_m3_net", "viton_global_ce", "viton_mmfl_net", "viton_dml", "viton_dml_softmax",
                "viton_dml_cosface", "viton_dml_arcface", "clothing_to_shop_global", "deepfashion_c2s_mmfl_net",
                "deepfashion_c2s_dml", "street2shop_mmfl_net", "deepfashion_asen", "deepfashion_m3_net"}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates_against_the_registries(path: Path) -> None:
    """Every name a recipe uses exists and every keyword it passes is accepted, without building."""
    from fashion_retrieval.data.benchmarks import BENCHMARKS
    from fashion_retrieval.data.readers import READERS
    from fashion_retrieval.losses import LOSSES
    from fashion_retrieval.models import MODELS
    from fashion_retrieval.registry import check_kwargs

    config = load_config(path)
    assert config.name == path.stem, "a recipe's name is its file name (runs/<name> by default)"
    check_kwargs(READERS.get(config.data.format), {"root": Path("."), **config.data.options}, config.data.format)
    for term in config.loss.terms:
        check_kwargs(LOSSES.get(term.name), {k: v for k, v in term.kwargs.items() if k != "label"}, term.name)
    if config.eval.benchmark is not None:
        BENCHMARKS.get(config.eval.benchmark)
    if config.model.name not in MODELS and config.model.name in ("global_net", "mmfl_net"):
        pytest.skip(f"model '{config.model.name}' is not implemented yet")
    builder = MODELS.get(config.model.name)
    check_kwargs(builder, {"num_items": 1, "attribute_sizes": [2], **config.model.kwargs}, config.model.name)
    if getattr(builder, "attribute_conditioned", False):
        assert config.data.sampler.kind == "attribute"


# ---- hostile recipes ----------------------------------------------------------------------------
def alias_bomb(levels: int = 9, fan_out: int = 9) -> str:
    """A "billion laughs" recipe: ``fan_out ** levels`` strings once its aliases are expanded,
    in a few hundred bytes. It sits under model.kwargs (free-form) and is quoted by train.epochs."""
    lines = [f"    l0: &l0 [{', '.join(['lol'] * fan_out)}]"]
    lines += [f"    l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * fan_out)}]" for n in range(1, levels + 1)]
    return (MINIMAL.replace("model: {name: global_net, kwargs: {backbone: resnet18}}\n",
                            "model:\n  name: global_net\n  kwargs:\n" + "\n".join(lines) + "\n")
            + f"train: {{epochs: *l{levels}}}\n")


def test_a_yaml_alias_bomb_is_refused_fast_in_one_line(recipe: Path) -> None:
    import time

    from typer.testing import CliRunner

    from fashion_retrieval.cli import app
    from test_index_cli import assert_one_line_error

    recipe.write_text(alias_bomb())
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "--config", str(recipe), "--out", str(recipe.with_name("run"))])
    elapsed = time.perf_counter() - started
    assert_one_line_error(result, f"{recipe}:", "refused", "alias bomb")
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert not recipe.with_name("run").exists()
    # a small alias is ordinary YAML and still works
    recipe.write_text(MINIMAL + "optim: &o {lr: 0.01}\neval: {batch_size: 8}\n")
    assert load_config(recipe).optim.lr == 0.01


def test_recursive_aliases_and_bombs_in_overrides_are_refused(recipe: Path) -> None:
    recipe.write_text(MINIMAL.replace("kwargs: {backbone: resnet18}", "kwargs: &k {backbone: resnet18, self: *k}"))
    with pytest.raises(ConfigError, match=r"tiny.yaml:\d+: refused: an alias refers to a value that contains it"):
        load_config(recipe)
    recipe.write_text(MINIMAL)
    bomb = "[" + ", ".join(["&a [" + ", ".join(["x"] * 9) + "]"] + ["*a"] * 8) + "]"
    assert len(load_config(recipe, [f"model.kwargs.ok={bomb}"]).model.kwargs["ok"]) == 9
    levels = "{" + ", ".join([f"l0: &l0 [{', '.join(['x'] * 9)}]"]
                             + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 8)]) + "}"
    with pytest.raises(ConfigError, match="override model.kwargs.big:1: refused: more than"):
        load_config(recipe, [f"model.kwargs.big={levels}"])
    # text that is not YAML stays a plain string, as before
    assert load_config(recipe, ["description=a: b: c"]).description == "a: b: c"


def test_config_errors_quote_at_most_a_short_value(recipe: Path) -> None:
    recipe.write_text(MINIMAL + f"train: {{epochs: {'x' * 4000}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    message = str(info.value)
    assert "train.epochs: Input should be a valid integer" in message and len(message) < 300, message
    assert "xxx…" in message and "\n" not in message


def test_a_plugin_registers_a_sampler_and_an_optimizer_by_name(recipe: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Samplers, optimizers and schedules are registries: a plugin adds one in its own file and
    the recipe names it (the plugin is imported before those names are checked)."""
    (tmp_path / "my_training_parts.py").write_text(
        "from fashion_retrieval.data.samplers import SAMPLERS\n"
        "from fashion_retrieval.optim import OPTIMIZERS, SCHEDULES\n"
        "for registry, name in ((SAMPLERS, 'my_sampler'), (OPTIMIZERS, 'my_optimizer'), (SCHEDULES, 'my_schedule')):\n"
        "    if name not in registry:\n"
        "        registry.register(name)(lambda **kwargs: None)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["data.sampler.kind=my_sampler", "optim.name=my_optimizer", "optim.scheduler=my_schedule"]
    with pytest.raises(ConfigError, match=r"data.sampler.kind: unknown sampler 'my_sampler'; should be 'attribute', "
                                          r"'cross_domain' or 'pk'"):
        load_config(recipe, names)
    config = load_config(recipe, names + ["plugins=[my_training_parts]"])
    assert (config.data.sampler.kind, config.optim.name, config.optim.scheduler) == (
        "my_sampler", "my_optimizer", "my_schedule")
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_plugin'"):
        load_config(recipe, ["plugins=[no_such_plugin]"])
