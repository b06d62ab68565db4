"""What the wheel carries and the command says about itself: the recipes (found by name), py.typed,
the licence, --version; and model.safetensors written with the run's file mode, not 0600.

Installing the wheel into a fresh venv and training a shipped recipe from it is
scripts/check_wheel.sh (slow: it builds a venv)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_checkpoint import _tiny

from fashion_retrieval import __version__
from fashion_retrieval.cli import app
from fashion_retrieval.recipes import recipe_names, resolve_recipe
from fashion_retrieval.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("wheel-source")
    # a copy keeps build/ and *.egg-info out of the tree; --no-build-isolation: this venv's
    # setuptools, nothing downloaded
    for name in ("src", "configs", "pyproject.toml", "setup.py", "LICENSE", "README.md"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True)
    (found,) = out.glob("fashion_retrieval-*.whl")
    return zipfile.ZipFile(found)


def test_the_wheel_ships_every_recipe_py_typed_and_the_licence(wheel):
    names = set(wheel.namelist())
    shipped = {Path(n).name for n in names if n.startswith("fashion_retrieval/configs/")}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.yaml")} and shipped
    assert "fashion_retrieval/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "fashion_retrieval/serve/static/index.html" in names and "fashion_retrieval/data/category_map.csv" in names
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {__version__}" in metadata and "License-Expression: Apache-2.0" in metadata


def test_version_and_recipe_listing():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fashion-retrieval {__version__}"
    listing = runner.invoke(app, ["recipes"])
    assert listing.exit_code == 0, listing.output
    assert "viton_mmfl_net" in listing.output and "MMFL-Net" in listing.output


def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "viton_mmfl_net" in recipe_names()
    assert resolve_recipe("viton_mmfl_net").name == "viton_mmfl_net.yaml"
    assert resolve_recipe("viton_mmfl_net.yaml").is_file()
    with pytest.raises(ConfigError, match="no shipped recipe has that name; did you mean viton_mmfl_net"):
        resolve_recipe("viton_mmfl_nte")
    with pytest.raises(ConfigError, match="no shipped recipe"):
        resolve_recipe("../configs/viton_mmfl_net")  # a name, never a path into the package
    result = runner.invoke(app, ["train", "--config", "viton_mmfl_net", "--data-root", tmp_path / "none"])
    assert result.exit_code == 2 and "config file not found" not in result.output
    assert "dataset folder not found" in result.output  # the recipe was read; the data is what is missing


def test_model_safetensors_gets_the_same_mode_as_the_other_files(tmp_path):
    old = os.umask(0o022)
    try:
        _tiny(tmp_path / "run")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").iterdir()}
    assert modes["model.safetensors"] == modes["meta.json"] == oct(0o644), modes


def test_the_installed_package_finds_its_recipes_by_name(wheel, tmp_path):
    """The wheel unpacked (what pip installs), imported from an empty folder away from the checkout."""
    wheel.extractall(tmp_path / "site")
    code = ("import fashion_retrieval.recipes as r; d = r.recipe_dir(); "
            "print(d); print(r.resolve_recipe('viton_mmfl_net'))")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, check=True).stdout.split()
    assert found == [str(tmp_path / "site" / "fashion_retrieval" / "configs"),
                     str(tmp_path / "site" / "fashion_retrieval" / "configs" / "viton_mmfl_net.yaml")]
