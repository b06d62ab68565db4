"""Every row of scripts/results_cpu.sh is a valid recipe: its overrides name real keys and values,
and the model, objective and optimizer they describe build. A typo in a row otherwise fails hours
into a background run, when the script reaches it."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fashion_retrieval.config import load_config
from fashion_retrieval.engine.builders import build_objective_for, build_optimizer, lr_factor
from fashion_retrieval.models import build_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "results_cpu.sh"


def script_groups() -> list[str]:
    listed = re.search(r"unknown group '\$group' \(([^)]*)\)", SCRIPT.read_text())
    assert listed, "results_cpu.sh no longer lists its groups in the unknown-group message"
    return [group.strip() for group in listed.group(1).split("|")]


def listed_rows(tmp_path: Path, groups: list[str], only: str = "") -> list[list[str]]:
    listing = tmp_path / "rows.tsv"
    subprocess.run(["bash", str(SCRIPT), *groups], check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "RESULTS_CPU_LIST": str(listing), "RESULTS_CPU_ROWS": only})
    return [[field for field in line.split("\t") if field] for line in listing.read_text().splitlines()]


def test_list_mode_trains_nothing_and_names_every_row(tmp_path):
    rows = listed_rows(tmp_path, ["converged"])
    names = [row[1] for row in rows]
    assert len(names) == len(set(names)) > 10
    assert "fashion_product_m3_net_every_attribute" in names
    row = rows[names.index("fashion_product_m3_net_every_attribute")]
    assert row[0] == "cpu_converged" and row[2] == "configs/fashion_product_m3_net.yaml"
    assert "loss.terms.2.every_attribute=true" in row and "train.early_stop={metric: overall/MAP@all}" in row
    assert not (REPO / "runs" / "results_cpu_converged" / "never").exists()


def test_rows_filter_keeps_the_named_rows_and_refuses_an_unknown_name(tmp_path):
    rows = listed_rows(tmp_path, ["converged"], only="fashion_product_m3_net_c viton_dml")
    assert [row[1] for row in rows] == ["viton_dml", "fashion_product_m3_net_c"]  # the groups' order

    listing = tmp_path / "typo.tsv"
    run = subprocess.run(["bash", str(SCRIPT), "converged"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "RESULTS_CPU_LIST": str(listing),
                              "RESULTS_CPU_ROWS": "viton_dml fashion_product_m3_net_x"})
    assert run.returncode == 2 and "fashion_product_m3_net_x" in run.stderr
    assert not listing.exists()  # refused before any row ran (or was listed)


def test_every_row_of_every_group_builds(tmp_path):
    rows = listed_rows(tmp_path, script_groups())
    assert rows
    models: dict[str, object] = {}  # one model per distinct model config (building one is the slow part)
    checked: set[str] = set()
    for folder, name, recipe, *overrides in rows:
        where = f"results_cpu.sh row {folder}/{name}"
        try:
            config = load_config(REPO / recipe, overrides)
        except Exception as exc:  # the message names the key; say which row it came from
            pytest.fail(f"{where}: {exc}")
        attributes = len(config.data.attributes or ()) or 3
        labels = SimpleNamespace(num_items=12, attribute_sizes=[4] * attributes)
        model_key = repr((config.model.name, config.model.build_kwargs(), attributes))
        key = repr((model_key, config.loss.terms, config.optim))
        if key in checked:
            continue
        try:
            if model_key not in models:
                kwargs = {**config.model.build_kwargs(), "num_items": labels.num_items,
                          "attribute_sizes": labels.attribute_sizes}
                models[model_key] = build_model(config.model.name, kwargs, initialise_backbone=False)
            model = models[model_key]
            objective = build_objective_for(config, model, labels)
            build_optimizer(config, model, objective)
            lr_factor(config, 10)(0)
        except Exception as exc:
            pytest.fail(f"{where}: {type(exc).__name__}: {exc}")
        checked.add(key)
    assert len(checked) > 10


def test_second_seed_rows_repeat_their_converged_rows_with_only_the_seed_changed(tmp_path):
    converged = {row[1]: row for row in listed_rows(tmp_path, ["converged"])}
    (tmp_path / "seed1").mkdir()
    seeds = listed_rows(tmp_path / "seed1", ["converged_seed1"])
    assert {row[1] for row in seeds} >= {"clothing_to_shop_global", "clothing_to_shop_classifier"}
    for row in seeds:
        assert row[0] == "cpu_converged_seed1"
        base = converged[row[1]]
        assert row[-1] == "seed=1" and "seed=0" in row  # COMMON's seed, overridden by the last one
        assert row[1:-1] == base[1:]
