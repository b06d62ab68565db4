"""Attacks of the classes in issues 20 and 21 that their first tests did not cover.

Each test here failed before the fix it names (see docs/reliability.md §4, "Tried again as an
attacker"). They stay fast: tiny crafted files, one module-scoped index.
"""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, features

from catalog_fixtures import save_tiny_checkpoint, write_catalog
from fashion_retrieval.data.images import ImageLoadError, load_rgb
from fashion_retrieval.index.build import build_index
from fashion_retrieval.serve.app import Limits, create_app
from fashion_retrieval.index.embedders import TorchEmbedder

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    checkpoint = save_tiny_checkpoint(root / "run", "global_net")
    write_catalog(root / "catalog", 4)
    build_index(checkpoint, root / "catalog", root / "index", progress=False)
    app = create_app(root / "index", TorchEmbedder(root / "index" / "model"), limits=Limits())
    return root, TestClient(app, base_url=LOCAL)


# ---- image formats PIL knows but whose cost the header does not tell ---------------------------
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def icon_hiding_a_large_png(side: int = 1500) -> bytes:
    """An .ico whose directory claims 16x16 but holds a ``side``x``side`` PNG: PIL decodes the
    PNG while *opening* the icon, before any size check can run (a 580 KB icon of 12000x12000
    held 550 MiB, then was refused)."""
    png = _png(Image.new("RGBA", (side, side), (10, 20, 30, 255)))
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return header + png


def _saved(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


UNDECODED = {
    "ico": icon_hiding_a_large_png,
    # openjpeg holds 4 bytes a sample plus PIL's copy: a 1 KB 6000x6000 file held 663 MiB
    "jpeg2000": lambda: _saved(Image.new("RGB", (300, 300), (200, 100, 50)), "JPEG2000"),
    "avif": lambda: _saved(Image.new("RGB", (300, 300), (200, 100, 50)), "AVIF"),
}


@pytest.mark.parametrize("kind", sorted(UNDECODED))
def test_image_formats_outside_the_photo_formats_are_refused_unopened(kind, served, tmp_path):
    if kind == "jpeg2000" and not features.check("jpg_2000") or kind == "avif" and not features.check("avif"):
        pytest.skip(f"this Pillow cannot write {kind}")
    data = UNDECODED[kind]()
    path = tmp_path / "photo.jpg"  # named as a catalog photo: the suffix decides nothing
    path.write_bytes(data)
    with pytest.raises(ImageLoadError) as caught:
        load_rgb(path)
    assert caught.value.reason.startswith("not an image"), caught.value.reason
    assert "JPEG, PNG" in caught.value.reason  # says what is read instead

    _, client = served
    response = client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")})
    assert response.status_code == 415, response.text


def tiff_16_bit_rgba_one_strip(side: int) -> bytes:
    """A deflate-compressed 16-bit RGBA TIFF whose one strip is the whole picture: libtiff
    decodes it into a buffer of 8 bytes a pixel before PIL's own copy (4), which the estimate
    from the mode alone did not count."""
    packer = zlib.compressobj(9)
    row = b"\x12\x34\x56\x78\x9a\xbc\xff\xff" * side
    strip = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 4, None), (259, 3, 1, 8), (262, 3, 1, 2),
            (273, 4, 1, None), (277, 3, 1, 4), (278, 4, 1, side), (279, 4, 1, len(strip)), (284, 3, 1, 1),
            (338, 3, 1, 2)]  # 258 BitsPerSample and 273 StripOffsets point after the directory
    directory_end = 8 + 2 + 12 * len(tags) + 4
    bits_at, strip_at = directory_end, directory_end + 8
    directory = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 273: strip_at}.get(tag, value)
        directory += (struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1
                      else struct.pack("<HHII", tag, kind, count, value))
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + struct.pack("<4H", *[16] * 4) + strip


TIFF_PROBE = """
import sys
from PIL import Image
from fashion_retrieval.data.images import decode_bytes, load_rgb

def status(key):  # kB lines of /proc/self/status, in bytes
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

small, big = sys.argv[1:3]
load_rgb(small)  # every code path warm: only the big decode can raise the peak
with Image.open(big) as image:
    estimate = decode_bytes(image)
# the peak so far (importing torch) is higher than what follows: reset the high-water mark, or
# the decode's own peak would hide below it
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
photo = load_rgb(big)
print(status("VmHWM") - before, estimate, photo.size[0])
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_a_16_bit_tiff_in_one_strip_decodes_within_its_memory_estimate(tmp_path):
    big, small = tmp_path / "big.tif", tmp_path / "small.tif"
    big.write_bytes(tiff_16_bit_rgba_one_strip(3000))
    small.write_bytes(tiff_16_bit_rgba_one_strip(200))
    assert big.stat().st_size < 200_000
    result = subprocess.run([sys.executable, "-c", TIFF_PROBE, str(small), str(big)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    grown, estimate, width = map(int, result.stdout.split())
    assert width == 3000
    assert grown <= estimate * 1.1 + 8 * 2**20, f"peak grew {grown / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB"


# ---- a checkpoint someone hands you ------------------------------------------------------------
def _edited_checkpoint(tmp_path, edit) -> "Path":
    import json

    run = save_tiny_checkpoint(tmp_path / "run", "global_net")
    meta = json.loads((run / "meta.json").read_text())
    edit(meta)
    (run / "meta.json").write_text(json.dumps(meta))
    return run


def test_a_meta_json_with_an_absurd_image_size_is_refused_before_any_image_is_resized(tmp_path):
    """[20000, 20000] made `index build` grow to 17 GB and be killed by the kernel."""
    from fashion_retrieval.engine.checkpoint import CheckpointError, load_for_inference

    run = _edited_checkpoint(tmp_path, lambda meta: meta.update(image_size=[20000, 20000]))
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(run)
    message = str(caught.value)
    assert "meta.json" in message and "image_size" in message and "\n" not in message


def test_model_sizes_in_meta_json_that_the_weights_do_not_have_are_refused_before_allocating(tmp_path):
    """num_items 1e11 allocated (or died trying: a traceback) a 400 GB classifier before the weights
    were compared; the skeleton built without memory is compared with the file's shapes first."""
    from fashion_retrieval.engine.checkpoint import CheckpointError, load_for_inference

    run = _edited_checkpoint(tmp_path, lambda meta: meta["model"]["kwargs"].update(num_items=10**11))
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(run)
    message = str(caught.value)
    assert "weights do not fit the model" in message and "100000000000" in message, message


def _edited_weights(tmp_path, edit) -> "Path":
    """The tiny checkpoint with its safetensors header (a dict of name → {dtype, shape,
    data_offsets}) edited in place; the tensor bytes stay as they are."""
    import json

    run = save_tiny_checkpoint(tmp_path / "run", "global_net")
    data = (run / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    (run / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])
    return run


def test_weights_stored_as_integers_are_refused_not_cast(tmp_path):
    """Relabelling the float tensors I32 loaded garbage silently; `index build` then ended in a
    traceback (`vectors contain NaN or infinite values`)."""
    from fashion_retrieval.engine.checkpoint import CheckpointError, load_for_inference

    def as_integers(header):
        for value in header.values():
            if isinstance(value, dict) and value.get("dtype") == "F32":
                value["dtype"] = "I32"

    with pytest.raises(CheckpointError, match="is I32 in the file, the model needs floating point"):
        load_for_inference(_edited_weights(tmp_path, as_integers))


def test_weights_of_a_diverged_run_are_refused_by_name(tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from fashion_retrieval.engine.checkpoint import CheckpointError, load_for_inference

    run = save_tiny_checkpoint(tmp_path / "run", "global_net")
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="np") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(run / "model.safetensors"))
    name = next(key for key, value in tensors.items() if value.dtype == np.float32 and value.ndim == 4)
    tensors[name][0, 0, 0, 0] = np.nan
    save_file(tensors, str(run / "model.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"NaN or infinite values \\(first in '{name}'\\)"):
        load_for_inference(run)


def test_a_model_whose_embeddings_overflow_stops_index_build_in_one_line(tmp_path):
    """Finite weights can still give infinite embeddings: `index build` ended in a ValueError
    traceback from the store; now one line, and no index is written."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    from typer.testing import CliRunner

    from fashion_retrieval.cli import app

    run = save_tiny_checkpoint(tmp_path / "run", "global_net")
    with safe_open(str(run / "model.safetensors"), framework="np") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(run / "model.safetensors"))
    for key, value in tensors.items():
        if key.endswith("weight") and value.ndim == 1:  # every batch-norm scale: overflows float32
            tensors[key] = np.full_like(value, 1e30)
    save_file(tensors, str(run / "model.safetensors"), metadata=metadata)
    write_catalog(tmp_path / "catalog", 2)
    result = CliRunner().invoke(app, ["index", "build", "--checkpoint", str(run), "--images",
                                      str(tmp_path / "catalog"), "--out", str(tmp_path / "index")])
    assert result.exit_code == 2, result.output
    assert "NaN or infinite embeddings" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "index").exists()


# ---- text from data printed to a terminal ------------------------------------------------------
ESCAPES = "\x1b[2J\x1b]0;owned\x07"  # clear the screen, set the terminal's title


@pytest.mark.parametrize("column", ["item_id", "category", "attributes"])
def test_control_characters_in_catalog_text_are_refused_naming_the_line(column, tmp_path):
    import csv

    from fashion_retrieval.data.table import AnnotationError, SampleTable

    good = {"path": "ok.jpg", "item_id": "p1", "category": "dress", "attributes": "{}"}
    crafted = {"item_id": "p" + ESCAPES, "category": "dress" + ESCAPES,
               "attributes": '{"colour": "red\\u001b[5m"}'}  # a JSON escape: no raw ESC in the file
    with open(tmp_path / "catalog.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(good))
        writer.writeheader()
        writer.writerow(good)
        writer.writerow({**good, "path": "bad.jpg", column: crafted[column]})
    with pytest.raises(AnnotationError) as caught:
        SampleTable.from_csv(tmp_path / "catalog.csv")
    message = str(caught.value)
    assert "catalog.csv:3" in message and "control character" in message and "\x1b" not in message, message


def test_search_prints_ids_and_categories_from_the_index_as_text(served, tmp_path):
    """Metadata an older index, another writer or `POST /items` (whose category is free text)
    put there: ESC sequences reached the terminal, and an id like "[/x]" was parsed as rich
    markup (a MarkupError traceback)."""
    from typer.testing import CliRunner

    from fashion_retrieval.cli import app
    from fashion_retrieval.index.catalog import CatalogIndex

    root, _ = served
    index = tmp_path / "index"
    import shutil

    shutil.copytree(root / "index", index)
    catalog = CatalogIndex.open(index)
    store = catalog.stores["default"]
    first = next(iter(store.items()))
    import numpy as np

    vector = np.ones((1, catalog.dim), np.float32)
    catalog.remove([first["id"]])
    catalog.add("default", ["[/x]" + ESCAPES], vector, [{**first, "item_id": "[/x]" + ESCAPES,
                                                        "category": "[bold]" + ESCAPES}])
    catalog.save()
    query = first["path"]
    result = CliRunner().invoke(app, ["search", query, "--index", str(index), "--top-k", "10"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "[/x]\\x1b[2J" in result.output and "[bold]\\x1b" in result.output


# ---- a crafted index -------------------------------------------------------------------------
def test_an_index_whose_manifest_counts_past_int64_is_refused_in_one_line(served, tmp_path):
    """next_iid 2**70 opened, searched, and `index add` then died in an OverflowError traceback."""
    import json
    import shutil

    from typer.testing import CliRunner

    from fashion_retrieval.cli import app

    root, _ = served
    index = tmp_path / "index"
    shutil.copytree(root / "index", index)
    manifest = sorted((index / "spaces" / "default").glob("manifest*.json"))[-1]  # the generation in use
    data = json.loads(manifest.read_text())
    data["next_iid"] = 2**70
    manifest.write_text(json.dumps(data))
    before = {p: p.read_bytes() for p in index.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["index", "add", "--index", str(index), "--images", str(root / "catalog")])
    assert result.exit_code == 2, result.output
    assert f"{manifest.name}: next_iid" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in index.rglob("*") if p.is_file()} == before


# ---- recipes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["9" * 5000, "2001-13-45", "!!float x"])
def test_recipe_values_yaml_cannot_build_are_one_line_errors(value, tmp_path):
    """A 5,000-digit integer (Python's int() limit) or an impossible date ended `train` in a
    ValueError traceback from inside PyYAML."""
    from typer.testing import CliRunner

    from fashion_retrieval.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: x\ntrain:\n  epochs: {value}\n")
    result = CliRunner().invoke(app, ["train", "-c", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"{recipe}: invalid YAML (a value cannot be read" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, files", [("../../run", {"model.safetensors": {}}), ("/tmp/run", {}),
                                         ("ok", {"../../../etc/passwd": {"size": 1, "sha256": "0"}})])
def test_a_private_zoo_registry_cannot_point_outside_its_folder(name, files, tmp_path, monkeypatch):
    """$FASHION_RETRIEVAL_ZOO names a registry someone else may have written: its model names
    became folders (zoo:../../run read any run directory) and its pinned file names paths."""
    import json

    from fashion_retrieval.zoo import ZooError, resolve

    entry = {"description": "d", "task": "attributes", "trained_on": "t", "files": files}
    (tmp_path / "registry.json").write_text(json.dumps({"models": {name: entry}}))
    with pytest.raises(ZooError, match="registry.json: (model name .* is not a plain folder name|entry 'ok' pins)"):
        resolve(f"zoo:{name}", tmp_path)
