"""Training end to end on tiny synthetic datasets: outputs, skipped images, and a resume after
SIGKILL that ends bit-identical to an uninterrupted run."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import test_checkpoint  # noqa: F401  registers the tiny test models
from conftest import write_truncated_jpeg

from fashion_retrieval.config import ConfigError, config_from_dict
from fashion_retrieval.engine.checkpoint import load_for_inference
from fashion_retrieval.engine.train import train

TESTS = Path(__file__).resolve().parent


def garment(size: tuple[int, int], colour: tuple[int, int, int], stripe: int, worn: bool) -> Image.Image:
    """A flat product shot (white background) or a 'worn' one (grey background, smaller garment)."""
    width, height = size
    image = Image.new("RGB", size, (120, 120, 120) if worn else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin = width // 4 if worn else width // 8
    box = (margin, height // 5, width - margin, height - height // 6)
    draw.rectangle(box, fill=colour)
    y = box[1] + (stripe % 4 + 1) * (box[3] - box[1]) // 6
    draw.rectangle((box[0], y, box[2], y + 3), fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
    return image


def write_synthetic_viton(root: Path, pairs: int = 60, broken: tuple[int, ...] = (3,)) -> Path:
    """viton layout (pairs.csv, person/, product/): pair_id % 10 in {0, 5} test, 9 val, others train."""
    rng = np.random.default_rng(0)
    (root / "person").mkdir(parents=True, exist_ok=True)
    (root / "product").mkdir(parents=True, exist_ok=True)
    lines = ["pair_id,person,product"]
    for pair in range(pairs):
        pair_id = f"{pair:06d}"
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        garment((48, 64), colour, pair, worn=True).save(root / "person" / f"{pair_id}.jpg", quality=90)
        if pair in broken:
            write_truncated_jpeg(root / "product" / f"{pair_id}.jpg")
        else:
            garment((48, 64), colour, pair, worn=False).save(root / "product" / f"{pair_id}.jpg", quality=90)
        lines.append(f"{pair_id},person/{pair_id}.jpg,product/{pair_id}.jpg")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root


TINY_RECIPE = {
    "name": "tiny-viton",
    "seed": 7,
    "plugins": ["test_checkpoint"],
    "data": {"format": "viton", "root": "viton", "image_size": [64, 48], "num_workers": 0,
             "sampler": {"kind": "cross_domain", "p": 4, "k": 2}},
    "model": {"name": "tiny_test_net", "kwargs": {"feat_dim": 16}},
    "loss": {"terms": [{"name": "cross_entropy", "weight": 1.0}, {"name": "trihard", "weight": 1.0, "margin": 0.3}]},
    "optim": {"name": "adamw", "lr": 0.01, "warmup_epochs": 1, "scheduler": "cosine"},
    "train": {"epochs": 4, "log_every": 1, "max_steps_per_epoch": 3, "checkpoint_every_steps": 2, "progress": False},
    "eval": {"benchmark": None},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_synthetic_viton(root / "viton")
    return root


def _recipe(tmp_path: Path, **changes) -> Path:
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    for dotted, value in changes.items():
        node = recipe
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-u", "-m", "fashion_retrieval", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _run_until(command: list[str], marker: str) -> str:
    """Run ``command`` and SIGKILL it as soon as it prints a line containing ``marker``."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    output = []
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        if marker in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    text = "".join(output)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed at '{marker}':\n{text}"
    return text


def _train_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k.startswith("train.") or k in ("step", "epoch", "lr")}
                for row in csv.DictReader(handle) if row.get("train.loss")]


def test_resume_after_sigkill_is_bit_identical(data_root: Path, tmp_path: Path) -> None:
    reference = train(config_from_dict(yaml.safe_load(_recipe(tmp_path).read_text())), data_root,
                      tmp_path / "reference")
    assert reference.epochs == 4 and reference.steps == 12

    # The interrupted run uses a DataLoader worker: augmentation seeds must not depend on that.
    recipe = _recipe(tmp_path, data__num_workers=1)
    run = tmp_path / "interrupted"
    base = ["train", "--config", str(recipe), "--data-root", str(data_root), "--out", str(run)]
    _run_until(_cli(*base), "checkpoint saved: epoch 1, step 3")  # killed after an epoch boundary
    second = _run_until(_cli(*base, "--resume"), "checkpoint saved: epoch 2 + 2 steps")  # killed mid-epoch
    assert "resuming" in second
    # The run folder carried to another place (another machine) without its decoded-image cache:
    # nothing in it may point back at where it was trained.
    moved = tmp_path / "elsewhere" / "interrupted"
    moved.parent.mkdir()
    shutil.move(run, moved)
    shutil.rmtree(moved / "decoded-images", ignore_errors=True)
    run, base = moved, base[:-1] + [str(moved)]
    finished = subprocess.run(_cli(*base, "--resume"), capture_output=True, text=True, env=_env(), timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "resuming" in finished.stdout

    expected, actual = load_file(tmp_path / "reference" / "model.safetensors"), load_file(run / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), f"{key} differs after resume"
    assert _train_rows(run) == _train_rows(tmp_path / "reference")


def test_training_outputs_and_skipped_images(data_root: Path, tmp_path: Path) -> None:
    config = config_from_dict(yaml.safe_load(_recipe(tmp_path, train__epochs=2, train__checkpoint_every_steps=None,
                                                     train__max_steps_per_epoch=None, train__eval_every=1,
                                                     eval={"benchmark": "viton_c2s", "split": "val"}).read_text()))
    messages: list[str] = []
    result = train(config, data_root, tmp_path / "run", log=messages.append)
    run = tmp_path / "run"
    for name in ("model.safetensors", "meta.json", "config.yaml", "metrics.csv", "checkpoint-last",
                 "eval-epoch001-val.json", "eval.json", "eval.npz"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # 60 pairs: 42 train items, one with an unreadable product photo -> cross-domain batches skip it.
    assert result.steps == 2 * (41 // 4)
    rows = _train_rows(run)
    assert {"train.loss", "train.cross_entropy", "train.trihard"} <= set(rows[0])
    assert float(rows[-1]["train.loss"]) < float(rows[0]["train.loss"]), "the tiny model did not learn"
    model, meta = load_for_inference(run)
    assert meta["model"]["kwargs"]["num_items"] == 42 and meta["image_size"] == [64, 48]
    assert meta["epoch"] == 2 and meta["label_space"]["items"][0] == "000001"
    assert torch.equal(model._modules["embed"].weight, result.model._modules["embed"].weight.cpu())
    # Evaluated on val after epoch 1 and on test (final_split) after the last epoch.
    assert result.evaluation["split"] == "test" and result.evaluation["benchmark"] == "viton_c2s"
    with open(run / "metrics.csv", newline="") as handle:
        columns = next(csv.reader(handle))
    assert "eval.val.overall/top1" in columns and "eval.test.overall/mAP" in columns
    assert [h["split"] for h in result.history] == ["val", "test"]
    assert any(m.startswith("evaluation after epoch 2 on viton_c2s/test: top1") for m in messages)


def test_learned_margins_are_logged(data_root: Path, tmp_path: Path) -> None:
    terms = [{"name": "dml", "learn_margins": True, "margin_reward": 1.0, "learn_scale": True}]
    config = config_from_dict(yaml.safe_load(_recipe(tmp_path, loss__terms=terms, train__epochs=2,
                                                     train__checkpoint_every_steps=None).read_text()))
    train(config, data_root, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train.loss")]
    positive = [float(row["learned.dml.positive_margin"]) for row in rows]
    negative = [float(row["learned.dml.negative_margin"]) for row in rows]
    scale = [float(row["learned.dml.scale"]) for row in rows]
    assert len(rows) == 6 and all(0 < p < n for p, n in zip(positive, negative))
    assert positive[0] != positive[-1] and negative[0] != negative[-1] and scale[0] != scale[-1], "nothing was learned"


def test_skipped_images_are_counted(data_root: Path, tmp_path: Path) -> None:
    # With P×K over items (pk), the broken product photo is drawn and must be counted, not fatal.
    config = config_from_dict(yaml.safe_load(_recipe(tmp_path, train__epochs=1, data__sampler={"kind": "pk", "p": 21, "k": 2},
                                                     train__max_steps_per_epoch=None).read_text()))
    messages: list[str] = []
    result = train(config, data_root, tmp_path / "run", log=messages.append)
    assert result.skipped_images >= 1
    assert any("000003.jpg" in m and "skipped" in m for m in messages)


def test_rerun_and_changed_recipe_are_refused(data_root: Path, tmp_path: Path) -> None:
    recipe = yaml.safe_load(_recipe(tmp_path, train__epochs=1, train__max_steps_per_epoch=1).read_text())
    train(config_from_dict(recipe), data_root, tmp_path / "run", log=lambda _: None)
    with pytest.raises(ConfigError, match="pass --resume"):
        train(config_from_dict(recipe), data_root, tmp_path / "run", log=lambda _: None)
    recipe["optim"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="optim.lr differs"):
        train(config_from_dict(recipe), data_root, tmp_path / "run", resume=True, log=lambda _: None)
    recipe["optim"]["lr"] = 0.01
    recipe["train"]["epochs"] = 2  # extending a finished run is allowed
    assert train(config_from_dict(recipe), data_root, tmp_path / "run", resume=True, log=lambda _: None).epochs == 2


# ---- command line ------------------------------------------------------------------------------
from typer.testing import CliRunner

from fashion_retrieval.cli import app


def test_cli_errors_are_one_line_with_exit_code_2(data_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    recipe = _recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("image_size", "imge_size"))
    result = runner.invoke(app, ["train", "--config", str(recipe), "--data-root", str(data_root),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"error: {recipe}: data.imge_size: unknown key (did you mean 'image_size'?)" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["train", "--config", str(_recipe(tmp_path)), "--data-root", str(tmp_path / "nowhere"),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "dataset folder not found" in result.output

    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "missing-run"), "--benchmark", "viton_c2s",
                                 "--data-root", str(data_root), "--json", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output

    result = runner.invoke(app, ["train", "--config", str(_recipe(tmp_path)), "--data-root", str(data_root),
                                 "--out", str(tmp_path / "run"), "model.name=tiny_test_nett"])
    assert result.exit_code == 2 and "unknown model 'tiny_test_nett' (did you mean 'tiny_test_net'?)" in result.output


def test_demo_quick_runs_end_to_end(tmp_path: Path) -> None:
    from test_evaluate import _write_styles

    _write_styles(tmp_path / "data" / "fashion-product", count=80)
    write_synthetic_viton(tmp_path / "data" / "viton", pairs=50, broken=())
    result = CliRunner().invoke(app, ["demo", "--quick", "--data-root", str(tmp_path / "data"),
                                      "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "fashion_product_attributes (val" in result.output and "demo finished" in result.output
    assert (tmp_path / "demo" / "demo_fashion_product_attributes-quick" / "eval.json").is_file()
    # A second demo reuses its runs: it re-evaluates instead of refusing the existing directory.
    again = CliRunner().invoke(app, ["demo", "--quick", "--data-root", str(tmp_path / "data"),
                                     "--out", str(tmp_path / "demo")])
    assert again.exit_code == 0, again.output


def test_category_identity_makes_categories_the_identities(tmp_path: Path) -> None:
    from conftest import write_clothing

    from fashion_retrieval.engine.builders import training_table

    write_clothing(tmp_path / "clothing")
    recipe = yaml.safe_load(_recipe(tmp_path).read_text())
    recipe["data"].update({"format": "clothing", "root": "clothing", "identity": "category"})
    table = training_table(config_from_dict(recipe), tmp_path)
    assert len(table) == 7 and {s.item_id for s in table} == {"dress", "pants", "t-shirt"}
    recipe["data"]["identity"] = "item"
    assert len({s.item_id for s in training_table(config_from_dict(recipe), tmp_path)}) == 7


def test_attribute_conditioned_training(tmp_path: Path) -> None:
    from test_evaluate import _write_styles

    _write_styles(tmp_path / "data" / "fashion-product", count=80)
    recipe = yaml.safe_load(_recipe(tmp_path).read_text())
    recipe.update({
        "data": {"format": "fashion_product", "root": "fashion-product", "image_size": [64, 48], "num_workers": 0,
                 "attributes": ["gender", "articleType", "baseColour", "season", "usage"],
                 "sampler": {"kind": "attribute", "p": 2, "k": 4}},
        "model": {"name": "tiny_test_attribute_net", "kwargs": {}},
        "loss": {"terms": [{"name": "attribute_bce"}, {"name": "attribute_triplet", "margin": 0.2}]},
        "train": {"epochs": 1, "log_every": 2, "progress": False},
        "eval": {"benchmark": "fashion_product_attributes", "final_split": "test"},
    })
    result = train(config_from_dict(recipe), tmp_path / "data", tmp_path / "run", log=lambda _: None)
    # 56 training images (ids % 10 not in {0, 5, 9}) in batches of P*K = 8.
    assert result.steps == 7
    assert set(result.evaluation["metrics"]["per_attribute"]) == set(recipe["data"]["attributes"])
    _, meta = load_for_inference(tmp_path / "run")
    assert meta["attributes"] == recipe["data"]["attributes"] and meta["model"]["kwargs"]["attribute_sizes"][0] == 2

    recipe["data"]["sampler"]["kind"] = "pk"
    with pytest.raises(ConfigError, match="attribute-conditioned and needs kind: attribute"):
        train(config_from_dict(recipe), tmp_path / "data", tmp_path / "other", log=lambda _: None)


def test_decoded_image_cache_trains_bit_identically(data_root: Path, tmp_path: Path) -> None:
    """Augmentation on: the cached run takes the same steps as decoding on the fly, and its
    second epoch onwards reads every image from the cache."""
    def weights(decoded_cache: str, out: str):
        recipe = config_from_dict(yaml.safe_load(_recipe(tmp_path, data__decoded_cache=decoded_cache).read_text()))
        result = train(recipe, data_root, tmp_path / out)
        return {k: v.clone() for k, v in result.model.state_dict().items()}, _train_rows(tmp_path / out)

    plain, plain_rows = weights("off", "plain")
    cached, cached_rows = weights("run", "cached")
    assert plain_rows == cached_rows
    assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)
    assert not (tmp_path / "plain" / "decoded-images").exists()
    from fashion_retrieval.data.image_cache import DecodedImageCache

    stats = DecodedImageCache(tmp_path / "cached" / "decoded-images", TINY_RECIPE["data"]["image_size"]).stats()
    assert stats.entries > 0 and stats.failures == 1  # the truncated product photo, still skipped


def test_early_stop_ends_on_a_plateau_and_resume_keeps_it(data_root: Path, tmp_path: Path) -> None:
    # No tiny model gains 100 points: with patience 1 the run stops after its second evaluation.
    rule = {"metric": "overall/mAP", "patience": 1, "min_delta": 100.0}
    recipe = _recipe(tmp_path, train__epochs=6, train__checkpoint_every_steps=None, train__max_steps_per_epoch=2,
                     train__eval_every=1, train__early_stop=rule, eval={"benchmark": "viton_c2s", "split": "val"})
    messages: list[str] = []
    result = train(config_from_dict(yaml.safe_load(recipe.read_text())), data_root, tmp_path / "run",
                   log=messages.append)
    assert result.epochs == 2 and result.steps == 4
    assert [h["split"] for h in result.history] == ["val", "val", "test"]
    assert result.evaluation["split"] == "test" and (tmp_path / "run" / "eval.json").exists()
    assert any(m.startswith("early stop after epoch 1: no") for m in messages)
    assert any(m.startswith("early stop after epoch 2: yes") for m in messages)
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        curve = [row for row in csv.DictReader(handle) if row.get("eval.val.overall/mAP")]
    assert [row["epoch"] for row in curve] == ["1", "2"]

    again: list[str] = []
    resumed = train(config_from_dict(yaml.safe_load(recipe.read_text())), data_root, tmp_path / "run",
                    resume=True, log=again.append)
    assert resumed.steps == 4 and any("stopped early after epoch 2" in m for m in again)


def test_early_stop_names_an_unknown_metric(data_root: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, train__epochs=2, train__checkpoint_every_steps=None, train__max_steps_per_epoch=1,
                     train__eval_every=1, train__early_stop={"metric": "overall/top-1"},
                     eval={"benchmark": "viton_c2s", "split": "val"})
    with pytest.raises(ConfigError, match=r"train.early_stop.metric: 'overall/top-1' is not among .*overall/top1"):
        train(config_from_dict(yaml.safe_load(recipe.read_text())), data_root, tmp_path / "run", log=lambda _: None)


def test_early_stop_without_evaluations_is_refused(tmp_path: Path) -> None:
    recipe = yaml.safe_load(_recipe(tmp_path, train__early_stop={"metric": "overall/mAP"}).read_text())
    with pytest.raises(ConfigError, match="train.early_stop needs evaluations"):
        config_from_dict(recipe)
