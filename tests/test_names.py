"""Names from data never become paths (security issue 20).

Crafted attribute names, space names, recipe names and item ids (``../../x``, an absolute path,
``..``, a name with a space, a unicode name, NUL and newline) are driven through every command
that turns a name into a folder: train (runs/<name>), index build, index add, serve uploads and
export, with FAISS and milvus-lite. A sentinel tree outside the index (exactly where the crafted
names used to point: ``INDEX/spaces/../../x``, ``x.old``, ``x.tmp-*``, an absolute folder) is
listed before and after; it must not change. Names with spaces or unicode must work end to end.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import quote as url_quote

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import test_checkpoint  # noqa: F401  registers tiny_test_attribute_net
from catalog_fixtures import jpeg_bytes, photo_like, write_catalog
from fashion_retrieval.cli import app
from fashion_retrieval.data.table import AnnotationError, SampleTable
from fashion_retrieval.engine import checkpoint as ckpt
from fashion_retrieval.engine.checkpoint import CheckpointError, TrainingState, save_for_inference
from fashion_retrieval.index.catalog import CatalogIndex
from fashion_retrieval.index.faiss_store import FaissStore
from fashion_retrieval.index.store import StoreError
from fashion_retrieval.models import MODELS
from fashion_retrieval.names import (MILVUS_IDENTIFIER, UnsafeNameError, check_name, is_component,
                                     milvus_identifier, path_component)

runner = CliRunner()
IMAGE_SIZE = [32, 24]
API_KEY = "names-test-key"
FRIENDLY = ["sleeve length", "Ärmel länge"]  # must work end to end
REFUSED = ["..", ".", "", "a\x00b", "x\ny"]  # no name may be this


# ---- the sentinel tree ---------------------------------------------------------------------
def listing(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (not following links): file contents, link targets, folders."""
    entries: dict[str, object] = {}
    if not root.exists() and not root.is_symlink():
        return entries
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = path.read_bytes()
    return entries


class World:
    """``work/`` holds the indexes; ``work/x*`` and ``outside/`` are somebody else's folders."""

    def __init__(self, root: Path):
        self.root = root
        self.work = root / "work"
        self.outside = root / "outside"
        self.absolute = str(self.outside / "target")  # an absolute name: Path(i) / "spaces" / it is it
        for folder in (self.work / "x", self.work / "x.old", self.work / "x.tmp-abcdefgh",
                       Path(self.absolute), Path(self.absolute + ".old"), self.outside / "keep"):
            folder.mkdir(parents=True)
            (folder / "precious.txt").write_text(f"do not touch {folder.name}\n")
            (folder / "manifest.json").write_text("{}")  # looks like a store; still not ours
        self.crafted = ["../../x", self.absolute, *FRIENDLY]

    def sentinels(self) -> dict[str, object]:
        return {"outside": listing(self.outside),
                **{name: listing(self.work / name) for name in ("x", "x.old", "x.tmp-abcdefgh")}}


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def attribute_checkpoint(run_dir: Path, attributes: list[str]) -> Path:
    """A tiny attribute-conditioned model whose meta.json carries ``attributes`` verbatim, as a
    model trained on a catalog CSV with those attribute keys would."""
    kwargs = {"attribute_sizes": [3] * len(attributes)}
    model = MODELS.build("tiny_test_attribute_net", **kwargs)
    save_for_inference(model.eval(), {"model": {"name": "tiny_test_attribute_net", "kwargs": kwargs},
                                      "image_size": IMAGE_SIZE, "attributes": list(attributes)}, run_dir)
    return run_dir


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and "img/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---- the rule itself -------------------------------------------------------------------------
def test_path_component_is_plain_stable_unique_and_never_a_path():
    names = ["colour", "sleeve_length", "a-b", "../../x", "/tmp/x", "..", "sleeve length", "Ärmel länge",
             "x/y", "x.y", "x", "X", "日本語", "a\x00b", "x\ny", "z" * 300]
    components = [path_component(n) for n in names]
    assert components[:3] == ["colour", "sleeve_length", "a-b"]  # old folders keep their names
    assert len(set(components)) == len(names)  # unique: "x/y", "x.y" and "x" do not meet
    assert components == [path_component(n) for n in names]  # stable
    for component in components:
        assert is_component(component) and "/" not in component and not component.startswith(".")
        assert len(component) < 100
    assert path_component("Ärmel länge").startswith("Armel-lange.")
    for name in names:
        assert MILVUS_IDENTIFIER.fullmatch(milvus_identifier(name)), name
    assert milvus_identifier("colour") == "space_colour"  # collections made before keep their names
    assert len({milvus_identifier(n) for n in names}) == len(names)


@pytest.mark.parametrize("name", REFUSED + ["q" * 201])
def test_check_name_refuses_with_one_line_naming_where_and_what(name):
    with pytest.raises(UnsafeNameError) as caught:
        check_name(name, "attribute", "catalog.csv:7")
    message = str(caught.value)
    assert message.startswith("catalog.csv:7: attribute ") and "\n" not in message and len(message) < 300
    assert repr(name)[:40] in message


def test_check_name_component_refuses_separators_accepts_friendly_names():
    for name in FRIENDLY + ["x.y"]:
        assert check_name(name, "recipe name", "r.yaml: name", component=True) == name
    for name in ["../../x", "/abs", "a/b", "a\\b", " padded "]:
        with pytest.raises(UnsafeNameError):
            check_name(name, "recipe name", "r.yaml: name", component=True)


def test_catalog_csv_refuses_attribute_names_no_folder_may_have(tmp_path):
    lines = ["path,item_id,attributes",
             'a.jpg,a,"{""../../x"": ""red"", ""Ärmel länge"": ""long""}"',
             'b.jpg,b,"{""x\\u0000y"": ""red""}"']
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(AnnotationError) as caught:
        SampleTable.from_csv(tmp_path / "catalog.csv")
    assert str(caught.value).startswith(f"{tmp_path / 'catalog.csv'}:3: attribute name 'x\\x00y' contains a control")
    (tmp_path / "catalog.csv").write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    table = SampleTable.from_csv(tmp_path / "catalog.csv")  # odd but harmless names are data
    assert table.attribute_names() == ["../../x", "Ärmel länge"]


# ---- index build, search and add, FAISS and Milvus --------------------------------------------
@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_index_build_and_add_with_crafted_attribute_names_stay_inside(world, store):
    if store == "milvus":
        pytest.importorskip("milvus_lite")
    before = world.sentinels()
    checkpoint = attribute_checkpoint(world.root / "run", world.crafted)
    photos = write_catalog(world.root / "catalog", 6)
    index = world.work / "index"
    result = run_cli("index", "build", "--checkpoint", checkpoint, "--images", world.root / "catalog",
                     "--out", index, "--store", store)
    assert result.exit_code == 0, result.output
    assert world.sentinels() == before
    assert {p.name for p in world.work.iterdir()} - {".index.lock"} == {"index", "x", "x.old", "x.tmp-abcdefgh"}

    manifest = json.loads((index / "index.json").read_text("utf-8"))
    assert manifest["spaces"] == world.crafted
    assert manifest["space_dirs"] == {name: path_component(name) for name in world.crafted}
    folder = index / ("milvus" if store == "milvus" else "spaces")
    assert sorted(p.name for p in folder.iterdir()) == sorted(manifest["space_dirs"].values())

    for name in world.crafted:  # searched by the attribute's own name, spaces and unicode included
        answer = run_cli("search", "--index", index, photos[2], "--attribute", name, "--json", "--top-k", "6")
        assert answer.exit_code == 0, answer.output
        assert len(json.loads(answer.stdout)["results"]) == 6

    write_catalog(world.root / "more", 3, first_seed=50, prefix="more")
    added = run_cli("index", "add", "--index", index, "--images", world.root / "more")
    assert added.exit_code == 0, added.output
    assert world.sentinels() == before
    assert len(CatalogIndex.open(index)) == 9
    answer = run_cli("search", "--index", index, photos[2], "--attribute", "Ärmel länge", "--json", "--top-k", "20")
    assert len(json.loads(answer.stdout)["results"]) == 9


@pytest.mark.parametrize("name", REFUSED, ids=repr)
def test_index_build_refuses_attribute_names_no_folder_may_have(world, name):
    before = world.sentinels()
    checkpoint = attribute_checkpoint(world.root / "run", [name, "colour"])
    write_catalog(world.root / "catalog", 3)
    result = run_cli("index", "build", "--checkpoint", checkpoint, "--images", world.root / "catalog",
                     "--out", world.work / "index")
    line = one_error_line(result)
    assert f"{checkpoint / 'meta.json'}: attribute {name!r}" in line
    assert not (world.work / "index").exists()
    assert world.sentinels() == before


@pytest.fixture
def built(world):
    """A FAISS index with a plain and a friendly attribute name."""
    checkpoint = attribute_checkpoint(world.root / "run", ["colour", "sleeve length"])
    photos = write_catalog(world.root / "catalog", 4)
    write_catalog(world.root / "more", 2, first_seed=50, prefix="more")
    result = run_cli("index", "build", "--checkpoint", checkpoint, "--images", world.root / "catalog",
                     "--out", world.work / "index")
    assert result.exit_code == 0, result.output
    return world.work / "index", photos


def _rewrite_manifest(index: Path, change) -> None:
    manifest = json.loads((index / "index.json").read_text("utf-8"))
    change(manifest)
    (index / "index.json").write_text(json.dumps(manifest), "utf-8")


@pytest.mark.parametrize("craft", ["legacy-relative", "legacy-absolute", "mapped-relative", "mapped-absolute"])
def test_crafted_index_json_never_reaches_outside(world, built, craft):
    """index.json is data too: a space name or a recorded folder pointing out of the index is refused
    by search and index add, and the sentinels (including ``x.old``, which recovery used to delete)
    stay as they were."""
    index, photos = built
    target = "../../x" if craft.endswith("relative") else world.absolute

    def change(manifest):
        if craft.startswith("legacy"):  # an index from before space_dirs: names used verbatim
            manifest["spaces"][0] = target
            manifest.pop("space_dirs", None)
        else:
            manifest["space_dirs"]["colour"] = target

    _rewrite_manifest(index, change)
    before = world.sentinels()
    for command in (["index", "add", "--index", index, "--images", world.root / "more"],
                    ["search", "--index", index, photos[0], "--attribute", "sleeve length", "--json"]):
        result = run_cli(*command)
        assert world.sentinels() == before
        line = one_error_line(result)
        assert str(index / "index.json") in line and "not a plain folder name" in line, line


def test_index_written_before_space_dirs_still_opens_and_is_updated(world, built):
    index, photos = built
    mapped = path_component("sleeve length")
    (index / "spaces" / mapped).rename(index / "spaces" / "sleeve length")  # the old verbatim layout
    _rewrite_manifest(index, lambda manifest: manifest.pop("space_dirs"))
    answer = run_cli("search", "--index", index, photos[0], "--attribute", "sleeve length", "--json")
    assert answer.exit_code == 0, answer.output
    assert run_cli("index", "add", "--index", index, "--images", world.root / "more").exit_code == 0
    manifest = json.loads((index / "index.json").read_text("utf-8"))
    assert manifest["space_dirs"] == {"colour": "colour", "sleeve length": "sleeve length"}
    assert len(CatalogIndex.open(index)) == 6


def test_build_next_to_a_users_old_folder_leaves_it_alone(world):
    """``--out photos`` beside a user's own ``photos.old``: crash recovery used to rename it into
    place (and then refuse the build); a folder without index.json is never ours."""
    checkpoint = attribute_checkpoint(world.root / "run", ["colour"])
    write_catalog(world.root / "catalog", 3)
    users = world.work / "photos.old"
    users.mkdir()
    (users / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (users / "photos.tmp-notmkdtmp").mkdir()
    before = listing(users)
    result = run_cli("index", "build", "--checkpoint", checkpoint, "--images", world.root / "catalog",
                     "--out", world.work / "photos")
    assert result.exit_code == 0, result.output
    assert listing(users) == before and (world.work / "photos" / "index.json").is_file()


def test_a_store_never_replaces_a_folder_that_is_not_a_store(tmp_path):
    import numpy as np

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    before = listing(folder)
    store = FaissStore(folder, 4)
    store.add(["a"], np.eye(4, dtype=np.float32)[:1])
    with pytest.raises(StoreError, match="not a store of ours"):
        store.save()
    assert listing(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_a_space_folder_linked_out_of_the_index_is_refused(world, built):
    """A symlink planted in spaces/ (the name is fine, the folder is not ours)."""
    index, photos = built
    (index / "spaces" / "colour").rename(world.root / "moved")
    (index / "spaces" / "colour").symlink_to(world.outside / "keep")
    before = world.sentinels()
    for command in (["index", "add", "--index", index, "--images", world.root / "more"],
                    ["search", "--index", index, photos[0], "--attribute", "colour", "--json"]):
        line = one_error_line(run_cli(*command))
        assert "outside" in line, line
    assert world.sentinels() == before


# ---- train: runs/<recipe name> -----------------------------------------------------------------
def _tiny_recipe(tmp_path: Path, name: str) -> Path:
    from test_train import TINY_RECIPE

    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["name"] = name
    recipe["train"].update(epochs=1, max_steps_per_epoch=1, checkpoint_every_steps=None)
    recipe["data"]["decoded_cache"] = "off"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "a/b", *REFUSED], ids=repr)
def test_train_refuses_recipe_names_that_are_not_one_folder(world, monkeypatch, name):
    name = world.absolute if name == "ABSOLUTE" else name
    cwd = world.work / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    recipe = _tiny_recipe(world.root, name)
    before = world.sentinels()
    result = run_cli("train", "--config", recipe, "--data-root", world.root / "no-data")
    line = one_error_line(result)
    assert f"{recipe}: name: " in line and "the recipe name becomes the run directory" in line, line
    assert list(cwd.iterdir()) == [] and world.sentinels() == before


def test_train_with_a_unicode_recipe_name_writes_runs_slash_that_name(world, monkeypatch):
    from test_train import write_synthetic_viton

    data_root = world.root / "data"
    write_synthetic_viton(data_root / "viton", pairs=20)
    cwd = world.work / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = run_cli("train", "--config", _tiny_recipe(world.root, "Ärmel länge"), "--data-root", data_root)
    assert result.exit_code == 0, result.output
    assert (cwd / "runs" / "Ärmel länge" / "model.safetensors").is_file()
    assert [p.name for p in cwd.iterdir()] == ["runs"] and [p.name for p in (cwd / "runs").iterdir()] == ["Ärmel länge"]


def test_training_checkpoint_swap_refuses_a_link_out_of_the_run(tmp_path):
    model, _ = test_checkpoint._tiny(tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    (tmp_path / "run" / ckpt.PREVIOUS_TRAINING_DIR).symlink_to(outside, target_is_directory=True)
    before = listing(outside)
    with pytest.raises(CheckpointError, match="outside|link"):
        ckpt.save_training_state(tmp_path / "run", model, TrainingState(epoch=0, step=0))
    assert listing(outside) == before


# ---- serve: uploads and item ids ----------------------------------------------------------------
def test_serve_item_ids_and_attribute_names_never_become_paths(world):
    from fashion_retrieval.index.build import build_index
    from fashion_retrieval.serve.app import create_app
    from fashion_retrieval.index.embedders import TorchEmbedder

    checkpoint = attribute_checkpoint(world.root / "run", world.crafted)
    write_catalog(world.root / "catalog", 4)
    index = world.work / "index"
    build_index(checkpoint, world.root / "catalog", index, progress=False)
    client = TestClient(create_app(index, TorchEmbedder(index / "model"), api_key=API_KEY),
                        base_url="http://127.0.0.1")  # the server answers only names that reach it
    before = world.sentinels()
    uploads = world.work / "index-uploads"
    for refused in ("..", ".", "x\ny", "a\x00b"):  # "/items/../image" would be a different URL
        answer = client.post("/items", files={"image": ("q.jpg", jpeg_bytes(photo_like(1)), "image/jpeg")},
                             data={"item_id": refused}, headers={"X-API-Key": API_KEY})
        assert answer.status_code == 400 and "item_id" in answer.json()["detail"], answer.text
    ids = ["../../x", world.absolute, "a b", "Ärmel länge", "../../x.old", "x/../../y"]
    for seed, item_id in enumerate(ids, 100):
        photo = jpeg_bytes(photo_like(seed))
        created = client.post("/items", files={"image": ("../../x/evil.jpg", photo, "image/jpeg")},
                              data={"item_id": item_id}, headers={"X-API-Key": API_KEY})
        assert created.status_code == 201, created.text
        stored = client.get(f"/items/{url_quote(item_id, safe='')}/image")
        assert stored.status_code == 200, (item_id, stored.text)
    assert world.sentinels() == before
    assert len(list(uploads.iterdir())) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}\.jpg", p.name) for p in uploads.iterdir())
    for name in world.crafted:
        found = client.post("/search", params={"attribute": name, "k": 20},
                            files={"image": ("q.jpg", jpeg_bytes(photo_like(1)), "image/jpeg")})
        assert found.status_code == 200 and len(found.json()["results"]) == 4 + len(ids), found.text
    for item_id in ids:
        removed = client.delete(f"/items/{url_quote(item_id, safe='')}", headers={"X-API-Key": API_KEY})
        assert removed.status_code == 200, removed.text
    assert list(uploads.iterdir()) == [] and world.sentinels() == before


# ---- export ------------------------------------------------------------------------------------
def test_export_of_a_model_with_crafted_attribute_names_writes_only_out(world):
    pytest.importorskip("onnxruntime")
    checkpoint = attribute_checkpoint(world.root / "run", world.crafted)
    before = world.sentinels()
    out = world.work / "onnx" / "model.onnx"
    result = run_cli("export", "onnx", "--checkpoint", checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.json"]
    assert json.loads(out.with_name("model.onnx.json").read_text("utf-8"))["attributes"] == world.crafted
    assert world.sentinels() == before
    assert sorted(p.name for p in world.work.iterdir()) == ["onnx", "x", "x.old", "x.tmp-abcdefgh"]
