"""`index build|add|remove` and `search` as a user runs them: real checkpoints, generated catalogs
with broken files, JSON output, attribute spaces, one-line errors and crash safety."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catalog_fixtures import ATTRIBUTES, model_ranking, photo_like, save_tiny_checkpoint, write_catalog
from fashion_retrieval.cli import app
from fashion_retrieval.index.build import remove_abandoned_staging
from fashion_retrieval.index.catalog import CatalogIndex

runner = CliRunner()


def run_cli(*args) -> "CliRunner.invoke":
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def search_json(index: Path, image: Path, *extra) -> list[dict]:
    result = run_cli("search", "--index", index, image, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2, one `error:` line naming the problem, and no traceback."""
    assert result.exit_code == 2, result.output
    # tqdm redraws its progress line with carriage returns; everything else is the message
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and "img/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A global_net checkpoint, a 12-photo catalog with two broken files, and its flat index."""
    root = tmp_path_factory.mktemp("plain")
    checkpoint = save_tiny_checkpoint(root / "run", "global_net")
    photos = write_catalog(root / "catalog", 12, broken=True)
    index = root / "index"
    result = run_cli("index", "build", "--checkpoint", checkpoint, "--images", root / "catalog", "--out", index)
    return root, checkpoint, photos, index, result


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """An ASEN checkpoint (random init: its two attributes give unrelated rankings) and its index."""
    root = tmp_path_factory.mktemp("conditioned")
    checkpoint = save_tiny_checkpoint(root / "run", "asen")
    photos = write_catalog(root / "catalog", 12)
    index = root / "index"
    result = run_cli("index", "build", "--checkpoint", checkpoint, "--images", root / "catalog", "--out", index,
                     "--attribute", "colour", "--attribute", "sleeve")
    assert result.exit_code == 0, result.output
    return root, checkpoint, photos, index


def test_build_skips_and_lists_unreadable_images(plain):
    root, _, photos, index, result = plain
    assert result.exit_code == 0, result.output
    assert f"indexed 12 of 14 images into {index}" in result.stdout
    assert "2 unreadable skipped" in result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.strip().startswith("skipped ")]
    assert len(skipped) == 2
    assert any("truncated.jpg" in line for line in skipped) and any("notes.jpg" in line for line in skipped)
    catalog = CatalogIndex.open(index)
    assert len(catalog) == 12 and catalog.spaces == ["default"]
    assert (index / "model" / "model.safetensors").is_file()  # the index carries its own model


def test_search_json_ranks_the_query_itself_first(plain):
    _, checkpoint, photos, index, _ = plain
    query = photos[5]
    results = search_json(index, query, "--top-k", "12")
    assert [r["rank"] for r in results] == list(range(1, 13))
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["id"] == query.stem and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[0]["path"] == str(query.resolve())
    # the index ranks exactly as the model does when it compares the photos itself
    assert [r["id"] for r in results] == model_ranking(checkpoint, query, photos)
    assert len(search_json(index, query, "--top-k", "3")) == 3


def test_search_prints_a_table_without_json(plain):
    _, _, photos, index, _ = plain
    result = run_cli("search", "--index", index, photos[0], "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert photos[0].stem in result.stdout and "score" in result.stdout


def test_add_and_remove_without_rebuild(plain, tmp_path):
    root, _, photos, built, _ = plain
    index = tmp_path / "index"
    run_cli("index", "build", "--checkpoint", root / "run", "--images", root / "catalog", "--out", index)
    before = {r["id"]: r["score"] for r in search_json(index, photos[0], "--top-k", "12")}
    generation = CatalogIndex.open(index).generation

    new = write_catalog(tmp_path / "new", 3, first_seed=100, prefix="new")
    result = run_cli("index", "add", "--index", index, "--images", tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert "added 3 of 3 images" in result.stdout
    catalog = CatalogIndex.open(index)
    assert len(catalog) == 15 and catalog.generation == generation + 1
    assert search_json(index, new[1])[0]["id"] == "new101"
    # the old vectors were kept, not recomputed: the same scores for the old items
    after = {r["id"]: r["score"] for r in search_json(index, photos[0], "--top-k", "15")}
    assert {k: after[k] for k in before} == before

    result = run_cli("index", "remove", "--index", index, "new101", "item003", "no-such-id")
    assert result.exit_code == 0, result.output
    assert "removed 2 of 3 ids" in result.stdout
    ids = [r["id"] for r in search_json(index, new[1], "--top-k", "20")]
    assert len(ids) == 13 and "new101" not in ids and "item003" not in ids


def test_attribute_index_has_one_space_per_attribute(conditioned):
    _, checkpoint, photos, index = conditioned
    catalog = CatalogIndex.open(index)
    assert catalog.spaces == ATTRIBUTES
    assert sorted(p.name for p in (index / "spaces").iterdir()) == sorted(ATTRIBUTES)
    query = photos[2]
    rankings = {}
    for attribute in ATTRIBUTES:
        results = search_json(index, query, "--attribute", attribute, "--top-k", "12")
        rankings[attribute] = [r["id"] for r in results]
        assert rankings[attribute] == model_ranking(checkpoint, query, photos, attribute)
        assert rankings[attribute][0] == query.stem
    # each space answers with its own attribute's embedding: switching changes the order
    assert rankings["colour"] != rankings["sleeve"]


def test_attribute_errors(conditioned, plain):
    root, _, photos, index = conditioned
    assert_one_line_error(run_cli("search", "--index", index, photos[0], "--attribute", "pattern"),
                          "unknown attribute 'pattern'", "colour, sleeve")
    assert_one_line_error(run_cli("search", "--index", index, photos[0]), "choose one of colour, sleeve")
    assert_one_line_error(run_cli("index", "build", "--checkpoint", root / "run", "--images", root / "catalog",
                                  "--out", root / "other", "--attribute", "pattern"), "unknown attribute 'pattern'")
    plain_root, _, plain_photos, plain_index, _ = plain
    assert_one_line_error(run_cli("search", "--index", plain_index, plain_photos[0], "--attribute", "colour"),
                          "no attribute spaces")
    assert_one_line_error(run_cli("index", "build", "--checkpoint", plain_root / "run", "--images",
                                  plain_root / "catalog", "--out", plain_root / "other", "--attribute", "colour"),
                          "attribute-conditioned model")


def test_user_errors_are_one_line(plain, tmp_path):
    root, _, photos, index, _ = plain
    build = ("index", "build", "--images", root / "catalog")
    assert_one_line_error(run_cli(*build, "--checkpoint", tmp_path / "missing-run", "--out", tmp_path / "i"),
                          "missing-run", "not found")
    assert_one_line_error(run_cli("search", "--index", tmp_path / "nowhere", photos[0]), "no such index directory")
    assert_one_line_error(run_cli("search", "--index", root / "catalog", photos[0]), "not an index")
    assert_one_line_error(run_cli("index", "add", "--index", tmp_path / "nowhere", "--images", root / "catalog"),
                          "no such index directory")
    assert_one_line_error(run_cli("search", "--index", index, root / "catalog" / "notes.jpg"),
                          "notes.jpg", "not an image")
    assert_one_line_error(run_cli("search", "--index", index, root / "catalog" / "truncated.jpg"),
                          "truncated.jpg", "truncated or corrupt")
    assert_one_line_error(run_cli("search", "--index", index, tmp_path / "absent.jpg"), "file not found")
    # a folder that is not an index is never replaced: --out pointing at the photos keeps them
    keep = write_catalog(tmp_path / "my-photos", 2)
    assert_one_line_error(run_cli(*build, "--checkpoint", root / "run", "--out", tmp_path / "my-photos"),
                          "is not an index")
    assert all(p.is_file() for p in keep)
    (tmp_path / "only-broken").mkdir()
    (tmp_path / "only-broken" / "a.jpg").write_text("no image")
    assert_one_line_error(run_cli("index", "build", "--checkpoint", root / "run", "--images",
                                  tmp_path / "only-broken", "--out", tmp_path / "i2"), "none of the 1 catalog images")


# ---- integrity: a damaged or corrupt index fails in one line, and is never saved over ------------
def rewrite(file: Path, data: bytes) -> None:
    """Replace ``file``'s content without touching other hard links to it (the fixture's copy)."""
    file.unlink()
    file.write_bytes(data)


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    rewrite(file, bytes(data))


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    rewrite(file, json.dumps(data).encode())


def replace_metadata_line(space: Path, number: int, line: str) -> None:
    """An index edited by hand with its checksums updated: the bad line is what open reaches."""
    import hashlib

    lines = (space / "base-000001.jsonl").read_text().splitlines(keepends=True)
    lines[number - 1] = line + "\n"
    data = "".join(lines).encode()
    rewrite(space / "base-000001.jsonl", data)
    manifest = json.loads((space / "manifest-000001.json").read_text())
    manifest["files"]["base-000001.jsonl"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    rewrite(space / "manifest-000001.json", json.dumps(manifest).encode())


SPACE = Path("spaces") / "default"
BASE, ROWS, MANIFEST = SPACE / "base-000001.faiss", SPACE / "base-000001.jsonl", SPACE / "manifest-000001.json"
DAMAGE = {
    "faiss_byte_flipped": (lambda i: flip_byte(i / BASE),
                           ("base-000001.faiss: sha256 differs from the one manifest-000001.json records",)),
    "model_byte_flipped": (lambda i: flip_byte(i / "model" / "model.safetensors"),
                           ("model.safetensors: sha256 differs from the one index.json records",)),
    "metadata_truncated": (lambda i: rewrite(i / ROWS, (i / ROWS).read_bytes()[:900]),
                           ("base-000001.jsonl: 900 bytes, but manifest-000001.json records", "truncated")),
    "manifest_count": (lambda i: edit_json(i / MANIFEST, count=13),
                       ("12 items after replaying the segments, but manifest-000001.json records count 13",)),
    "index_json_not_json": (lambda i: rewrite(i / "index.json", b'{"format_version": 2, "model": '),
                            ("index.json:1: corrupt JSON",)),
    "index_json_key_missing": (lambda i: edit_json(i / "index.json", spaces=None), ("index.json: missing 'spaces'",)),
    "manifest_not_an_object": (lambda i: rewrite(i / MANIFEST, b"[]"),
                               ("manifest-000001.json: expected a JSON object, got array",)),
    "metadata_line_key_missing": (lambda i: replace_metadata_line(i / SPACE, 2, '{"id": "x"}'),
                                  ("base-000001.jsonl:2: missing 'iid'",)),
    "metadata_line_corrupt": (lambda i: replace_metadata_line(i / SPACE, 5, '{"id": "item004", "iid": 4, "pa'),
                              ("base-000001.jsonl:5: corrupt JSON line",)),
}
COMMANDS = {
    "search": lambda index, root, photos: ("search", "--index", index, photos[0]),
    "add": lambda index, root, photos: ("index", "add", "--index", index, "--images", root / "catalog"),
    "remove": lambda index, root, photos: ("index", "remove", "--index", index, photos[0].stem),
    "serve": lambda index, root, photos: ("serve", "--index", index),
}


def file_contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_index_fails_in_one_line_and_is_left_as_it_is(plain, tmp_path, monkeypatch, damage, command):
    root, _, photos, built, _ = plain
    index = tmp_path / "index"
    shutil.copytree(built, index, copy_function=os.link)  # each damage rewrites the file it changes
    damage_index, fragments = DAMAGE[damage]
    damage_index(index)
    before = file_contents(index)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve started on a damaged index"))
    assert_one_line_error(run_cli(*COMMANDS[command](index, root, photos)), str(index), *fragments)
    assert file_contents(index) == before  # `index add` / `remove` refused: nothing rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "index"]  # no temporary copy, no .old
    assert len(CatalogIndex.open(built)) == 12  # the fixture's files were not reached through the links


def as_format_1(index: Path) -> None:
    """Lay a fresh build's store out as format 1 did (the code before segments): index.faiss,
    metadata.jsonl and manifest.json, under an index.json of format 1."""
    space = index / SPACE
    manifest = json.loads((space / "manifest-000001.json").read_text())
    os.replace(space / "base-000001.faiss", space / "index.faiss")
    os.replace(space / "base-000001.jsonl", space / "metadata.jsonl")
    legacy = {key: manifest[key] for key in ("store", "kind", "dim", "count", "next_iid", "nlist", "pq_m", "hnsw_m",
                                             "info")}
    legacy.update(format_version=1, files={"index.faiss": manifest["files"]["base-000001.faiss"],
                                           "metadata.jsonl": manifest["files"]["base-000001.jsonl"]})
    (space / "manifest.json").write_text(json.dumps(legacy))
    (space / "manifest-000001.json").unlink()
    edit_json(index / "index.json", format_version=1)


def test_an_index_of_format_1_is_migrated_by_index_add_without_a_rewrite(plain, tmp_path):
    root, _, photos, built, _ = plain
    index = tmp_path / "index"
    shutil.copytree(built, index, copy_function=os.link)
    as_format_1(index)
    vectors = (index / SPACE / "index.faiss").stat().st_ino
    assert search_json(index, photos[3])[0]["id"] == photos[3].stem
    new = write_catalog(tmp_path / "new", 2, first_seed=100, prefix="new")
    assert run_cli("index", "add", "--index", index, "--images", tmp_path / "new").exit_code == 0
    assert json.loads((index / "index.json").read_text())["format_version"] == 2
    assert sorted(p.name for p in (index / SPACE).iterdir()) == [
        "index.faiss", "manifest-000002.json", "metadata.jsonl", "seg-000002.jsonl", "seg-000002.vec"]
    assert (index / SPACE / "index.faiss").stat().st_ino == vectors  # named by the new manifest, not rewritten
    assert len(CatalogIndex.open(index)) == 14
    assert search_json(index, new[1])[0]["id"] == new[1].stem
    assert search_json(index, photos[3])[0]["id"] == photos[3].stem


def test_an_index_written_before_checksums_opens_and_gains_them_at_its_next_save(plain, tmp_path):
    root, _, photos, built, _ = plain
    index = tmp_path / "index"
    shutil.copytree(built, index, copy_function=os.link)
    as_format_1(index)
    edit_json(index / "index.json", files=None)
    edit_json(index / SPACE / "manifest.json", files=None)
    assert search_json(index, photos[3])[0]["id"] == photos[3].stem
    write_catalog(tmp_path / "new", 1, first_seed=100, prefix="new")
    assert run_cli("index", "add", "--index", index, "--images", tmp_path / "new").exit_code == 0
    assert set(json.loads((index / "index.json").read_text())["files"]) == {"model/model.safetensors", "model/meta.json"}
    assert set(json.loads((index / SPACE / "manifest-000002.json").read_text())["files"]) == {
        "index.faiss", "metadata.jsonl", "seg-000002.vec", "seg-000002.jsonl"}
    # the weights' sha256 that index.json always recorded still guards an old index's model copy
    edit_json(index / "index.json", files=None)
    flip_byte(index / "model" / "model.safetensors")
    assert_one_line_error(run_cli("search", "--index", index, photos[3]),
                          "model.safetensors: sha256 differs from the model's in index.json")


def test_two_images_with_one_stem_in_a_folder_are_refused_naming_both(plain, tmp_path):
    root = plain[0]
    write_catalog(tmp_path / "photos", 3)
    photo_like(7).save(tmp_path / "photos" / "item001.png")
    result = run_cli("index", "build", "--checkpoint", root / "run", "--images", tmp_path / "photos",
                     "--out", tmp_path / "index")
    assert_one_line_error(result, "item001.png", "item001.jpg", "image names must be unique")
    assert not (tmp_path / "index").exists()
    (tmp_path / "classes" / "shirts").mkdir(parents=True)  # the same in class folders (--format folder)
    for name in ("item001.jpg", "item001.png"):
        shutil.copyfile(tmp_path / "photos" / name, tmp_path / "classes" / "shirts" / name)
    result = run_cli("index", "build", "--checkpoint", root / "run", "--images", tmp_path / "classes",
                     "--format", "folder", "--out", tmp_path / "index")
    assert_one_line_error(result, "item001.png", "item001.jpg", "image names must be unique")


def test_two_images_with_one_stem_of_one_item_in_a_csv_get_their_paths_as_ids(plain, tmp_path):
    """x.jpg and x.png of one product: only those two get their paths as ids; every other image
    keeps its item:stem id instead of being renamed because of them."""
    root = plain[0]
    photos = write_catalog(tmp_path / "photos", 3)
    photo_like(7).save(tmp_path / "photos" / "item001.png")
    (tmp_path / "catalog.csv").write_text("path,item_id\n" "photos/item000.jpg,shirt\n" "photos/item002.jpg,shirt\n"
                                          "photos/item001.jpg,dress\n" "photos/item001.png,dress\n")
    index = tmp_path / "index"
    result = run_cli("index", "build", "--checkpoint", root / "run", "--images", tmp_path / "catalog.csv", "--out", index)
    assert result.exit_code == 0, result.output
    catalog = CatalogIndex.open(index)
    ids = sorted(item["id"] for item in catalog.stores["default"].items())
    assert ids == ["dress:photos/item001.jpg", "dress:photos/item001.png", "shirt:item000", "shirt:item002"]
    assert catalog.get_metadata("dress:photos/item001.png")["path"] == str((tmp_path / "photos" / "item001.png").resolve())
    assert search_json(index, photos[1])[0]["id"] == "dress:photos/item001.jpg"


def test_search_after_the_training_run_overwrote_its_checkpoint(plain, tmp_path):
    """The index embeds queries with its own copy of the model, not whatever the run holds now."""
    root, _, photos, _, _ = plain
    checkpoint = save_tiny_checkpoint(tmp_path / "run", "global_net", seed=0)
    index = tmp_path / "index"
    run_cli("index", "build", "--checkpoint", checkpoint, "--images", root / "catalog", "--out", index)
    expected = [r["id"] for r in search_json(index, photos[4], "--top-k", "12")]
    save_tiny_checkpoint(checkpoint, "global_net", seed=1)  # training went on and saved new weights
    assert [r["id"] for r in search_json(index, photos[4], "--top-k", "12")] == expected


# ---- crash safety: SIGKILL a real `index build` over an index that already answers -------------------
PAUSING_BUILD = """
import sys, time
from pathlib import Path
import fashion_retrieval.index.catalog as catalog
import fashion_retrieval.index.store as store

phase = sys.argv[1]
marker = Path(sys.argv[2])
real_swap_in, real_write = catalog.swap_in, catalog.write_file_synced

def pause():
    marker.write_text(phase)
    time.sleep(120)  # the test kills us here

def write_then_pause(path, data):  # the new index half written: index.json is the last file
    if path.name == "index.json":
        pause()
    real_write(path, data)

def swap_halfway(tmp, path, **_):  # the old index moved aside, the new one not yet in place
    store.fsync_dir(tmp)
    path.rename(path.with_name(path.name + ".old"))
    pause()

if phase == "writing":
    catalog.write_file_synced = write_then_pause
elif phase == "swapping":
    catalog.swap_in = swap_halfway
from fashion_retrieval.cli import app
sys.argv = ["fashion-retrieval", *sys.argv[3:]]
app()
"""


def start_build(tmp_path: Path, phase: str, checkpoint: Path, images: Path, index: Path):
    marker = tmp_path / f"{phase}.marker"
    script = tmp_path / "pausing_build.py"
    script.write_text(PAUSING_BUILD)
    temporary = tmp_path / "tmp"  # where the build copies the checkpoint
    temporary.mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, str(script), phase, str(marker), "index", "build",
                                "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(index)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(temporary)})
    return process, marker


def test_a_build_removes_the_checkpoint_copies_of_killed_builds_only(plain, tmp_path, monkeypatch):
    root, checkpoint, _, _, _ = plain
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    copies = {name: tmp_path / "tmp" / f"fashion-retrieval-model-{name}-abcd1234" for name in
              (f"{host}.{gone.stdout.strip()}", f"{host}.{os.getpid()}", f"otherhost.{gone.stdout.strip()}")}
    for copy in copies.values():
        copy.mkdir(parents=True)
        (copy / "model.safetensors").write_bytes(b"x")
    result = run_cli("index", "build", "--checkpoint", checkpoint, "--images", root / "catalog", "--out",
                     tmp_path / "index")
    assert result.exit_code == 0, result.output
    # the finished process's copy is removed; a live process's and another host's are not
    assert [name for name, copy in copies.items() if copy.exists()] == list(copies)[1:]
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted(p.name for p in list(copies.values())[1:])


def wait_for(condition, process, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the build never reached the point to kill it at"
        time.sleep(0.02)


@pytest.mark.parametrize("phase", ["embedding", "writing", "swapping"])
def test_sigkill_during_build_keeps_the_previous_index(plain, tmp_path, phase):
    root, checkpoint, photos, built, _ = plain
    index = tmp_path / "index"
    shutil.copytree(built, index, copy_function=os.link)  # a previous index that answers
    bigger = tmp_path / "bigger"
    write_catalog(bigger, 20, first_seed=200, prefix="big")
    process, marker = start_build(tmp_path, phase, checkpoint, bigger, index)
    try:
        if phase == "embedding":  # tqdm's first progress line: the model is loaded, images are being read
            stderr_seen = bytearray()
            os.set_blocking(process.stderr.fileno(), False)

            def embedding_started() -> bool:
                stderr_seen.extend(process.stderr.read() or b"")
                return b"embedding" in stderr_seen

            wait_for(embedding_started, process)
        else:
            wait_for(marker.exists, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    if phase == "swapping":
        assert not index.exists()  # killed between the two renames: only index.old is left
    catalog = CatalogIndex.open(index)
    assert len(catalog) == 12
    assert search_json(index, photos[7])[0]["id"] == photos[7].stem
    assert not list(tmp_path.glob("index.tmp-*")) and not (tmp_path / "index.old").exists()
    # the killed build's copy of the checkpoint is removed by the next build (remove_abandoned_staging)
    abandoned = list((tmp_path / "tmp").glob(f"fashion-retrieval-model-*.{process.pid}-*"))
    assert len(abandoned) == 1 and (abandoned[0] / "model.safetensors").is_file()
    assert remove_abandoned_staging(tmp_path / "tmp") == abandoned and not abandoned[0].exists()
    if phase == "swapping":  # and the next build over it completes
        assert run_cli("index", "build", "--checkpoint", checkpoint, "--images", bigger, "--out", index).exit_code == 0
        assert len(CatalogIndex.open(index)) == 20


# ---- crash safety: SIGKILL an incremental `index add` at each step of its commit -------------------
PAUSING_ADD = """
import sys, time
from pathlib import Path
import fashion_retrieval.index.catalog as catalog
import fashion_retrieval.index.faiss_store as faiss_store

phase = sys.argv[1]
marker = Path(sys.argv[2])
real_write, real_adopt = faiss_store.write_file_synced, faiss_store.FaissStore.adopt
real_catalog_write = catalog.write_file_synced

def pause():
    marker.write_text(phase)
    time.sleep(120)  # the test kills us here

def write_segment_halfway(path, data):  # the segment's vectors half on disk, its metadata not yet
    if path.name.startswith("seg-") and path.name.endswith(".vec"):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        pause()
    real_write(path, data)

def before_commit(path, data):  # every space's next manifest written; index.json not yet replaced
    if path.name == "index.json.tmp":
        pause()
    real_catalog_write(path, data)

def after_commit(self, manifest):  # index.json replaced; the old generation's files not yet deleted
    pause()

if phase == "segment":
    faiss_store.write_file_synced = write_segment_halfway
elif phase == "commit":
    catalog.write_file_synced = before_commit
elif phase == "cleanup":
    faiss_store.FaissStore.adopt = after_commit
from fashion_retrieval.cli import app
sys.argv = ["fashion-retrieval", *sys.argv[3:]]
app()
"""


@pytest.mark.parametrize("phase", ["segment", "commit", "cleanup"])
def test_sigkill_during_an_incremental_add_loses_nothing(plain, tmp_path, phase):
    root, checkpoint, photos, built, _ = plain
    index = tmp_path / "index"
    shutil.copytree(built, index, copy_function=os.link)
    new = write_catalog(tmp_path / "new", 3, first_seed=300, prefix="new")
    marker, script = tmp_path / "marker", tmp_path / "pausing_add.py"
    script.write_text(PAUSING_ADD)
    process = subprocess.Popen([sys.executable, str(script), phase, str(marker), "index", "add", "--index", str(index),
                                "--images", str(tmp_path / "new")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(marker.exists, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    catalog = CatalogIndex.open(index)
    committed = phase == "cleanup"  # killed after index.json was replaced: the add is complete
    assert len(catalog) == 12 + 3 * committed
    assert {item["id"] for item in catalog.stores["default"].items()} >= {p.stem for p in photos}  # nothing lost
    assert search_json(index, photos[7])[0]["id"] == photos[7].stem
    assert (search_json(index, new[1])[0]["id"] == new[1].stem) == committed
    # the next add completes over whatever the killed one left, and leaves only its own files
    assert run_cli("index", "add", "--index", index, "--images", tmp_path / "new").exit_code == 0
    assert len(CatalogIndex.open(index)) == 15
    assert search_json(index, new[2])[0]["id"] == new[2].stem
    generation = json.loads((index / "index.json").read_text())["generation"]
    names = sorted(p.name for p in (index / SPACE).iterdir())
    assert names == ["base-000001.faiss", "base-000001.jsonl", f"manifest-{generation:06d}.json",
                     *[f"seg-{g:06d}.{suffix}" for g in range(2, generation + 1) for suffix in ("jsonl", "vec")]]
    assert not (index / "index.json.tmp").exists()


def test_milvus_store_builds_searches_and_removes(plain, tmp_path):
    pytest.importorskip("milvus_lite")
    root, _, photos, _, _ = plain
    index = tmp_path / "index"
    result = run_cli("index", "build", "--checkpoint", root / "run", "--images", root / "catalog", "--out", index,
                     "--store", "milvus")
    assert result.exit_code == 0, result.output
    assert "indexed 12 of 14 images" in result.stdout
    assert json.loads((index / "index.json").read_text())["store"] == "milvus"
    assert search_json(index, photos[9])[0]["id"] == photos[9].stem
    assert run_cli("index", "remove", "--index", index, photos[9].stem).exit_code == 0
    assert photos[9].stem not in [r["id"] for r in search_json(index, photos[9], "--top-k", "12")]


def test_milvus_server_store_builds_adds_searches_and_removes(plain, tmp_path, milvus_server_uri, monkeypatch):
    """--store milvus --milvus-uri: vectors on a real server process; the index folder keeps the
    model copy and index.json (with the URI, never the token)."""
    root, _, photos, _, _ = plain
    monkeypatch.setenv("MILVUS_TOKEN", "root:Milvus")
    index = tmp_path / "served"
    result = run_cli("index", "build", "--checkpoint", root / "run", "--images", root / "catalog", "--out", index,
                     "--store", "milvus", "--milvus-uri", milvus_server_uri)
    assert result.exit_code == 0, result.output
    manifest = json.loads((index / "index.json").read_text())
    assert manifest["milvus_uri"] == milvus_server_uri and "root:Milvus" not in (index / "index.json").read_text()
    assert not (index / "milvus").exists()
    assert search_json(index, photos[9])[0]["id"] == photos[9].stem
    new = write_catalog(tmp_path / "new", 1, first_seed=900, prefix="new")
    assert run_cli("index", "add", "--index", index, "--images", tmp_path / "new").exit_code == 0
    assert search_json(index, new[0])[0]["id"] == new[0].stem
    assert run_cli("index", "remove", "--index", index, photos[9].stem).exit_code == 0
    assert photos[9].stem not in [r["id"] for r in search_json(index, photos[9], "--top-k", "13")]
    assert len(CatalogIndex.open(index)) == 12
    assert_one_line_error(run_cli("index", "build", "--checkpoint", root / "run", "--images", root / "catalog",
                                  "--out", tmp_path / "x", "--milvus-uri", milvus_server_uri), "needs --store milvus")


@pytest.mark.shared_data
def test_index_of_real_shop_photos_answers_a_consumer_photo(shared_data_root, plain, tmp_path):
    """30 fashion-product shop photos (read in their official format, then as a CSV table) and a
    consumer photo from clothing/ as the query."""
    from dataclasses import replace

    from fashion_retrieval.data.readers import READERS
    from fashion_retrieval.data.table import SampleTable

    root = plain[0]
    shop = READERS.build("fashion_product", root=shared_data_root / "fashion-product")
    # absolute image paths: the table lives in tmp_path, the photos stay in the shared data
    subset = SampleTable([replace(s, path=str(shop.resolve(s))) for s in list(shop)[:30]], tmp_path, "shop30")
    subset.to_csv(tmp_path / "shop30.csv")
    index = tmp_path / "index"
    result = run_cli("index", "build", "--checkpoint", root / "run", "--images", tmp_path / "shop30.csv", "--out", index)
    assert result.exit_code == 0, result.output
    assert "indexed 30 of 30 images" in result.stdout
    shop_photo = shop.resolve(list(shop)[7])
    first = search_json(index, shop_photo)[0]
    assert first["item_id"] == list(shop)[7].item_id and first["score"] == pytest.approx(1.0, abs=1e-4)
    consumer = sorted((shared_data_root / "clothing" / "validation" / "dress").glob("*.jpg"))[0]
    results = search_json(index, consumer, "--top-k", "5")
    assert len(results) == 5 and [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert all(Path(r["path"]).is_file() for r in results)


def test_cli_entry_point_runs_as_a_user_would(plain):
    """The installed module entry point, in a fresh interpreter, prints JSON for a search."""
    _, _, photos, index, _ = plain
    result = subprocess.run([sys.executable, "-m", "fashion_retrieval", "search", "--index", str(index),
                             str(photos[1]), "--json", "--top-k", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["id"] == photos[1].stem


def test_a_failing_faiss_command_does_not_load_pymilvus():
    """The one-line error of a FAISS index command must not import pymilvus: its gRPC threads
    printed `epoll_wait error: Bad file descriptor` beside the error (seen in CI)."""
    code = ("import sys; from fashion_retrieval.index.cli import _known_errors; _known_errors(); "
            "print(sorted(m for m in ('pymilvus', 'grpc') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
