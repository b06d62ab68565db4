"""One behavioural suite for every vector store: FAISS (each index kind) and Milvus (lite)."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from fashion_retrieval.index.faiss_store import FaissStore, recover
from fashion_retrieval.index.store import StoreError

DIM = 16


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_store(kind: str, path, request=None):
    if kind == "milvus":
        pytest.importorskip("milvus_lite")
        from fashion_retrieval.index.milvus_store import MilvusStore

        return MilvusStore(path, DIM)
    if kind == "milvus-server":  # a real server process over TCP: one collection per test
        from fashion_retrieval.index.milvus_store import MilvusStore

        uri = request.getfixturevalue("milvus_server_uri")
        return MilvusStore(uri, DIM, collection=f"t{abs(hash(request.node.nodeid)) % 10**12}", replace=True)
    return FaissStore(path, DIM, kind)


def reopen(kind: str, store):
    store.save()
    if kind.startswith("milvus"):
        from fashion_retrieval.index.milvus_store import MilvusStore

        store.close()
        return MilvusStore.open(store.path, collection=store.collection)
    return FaissStore.open(store.path)


STORES = ["flat", "ivf", "hnsw", "ivfpq", "milvus", "milvus-server"]
EXACT = {"flat", "hnsw", "milvus", "milvus-server"}  # at this size HNSW and Milvus (flat) are exact


@pytest.mark.parametrize("kind", STORES)
def test_add_search_remove_save_open(kind, tmp_path, request):
    vectors = unit_vectors(400)
    ids = [f"item-{i}" for i in range(400)]
    store = make_store(kind, tmp_path / "index", request)
    store.add(ids, vectors, [{"n": i} for i in range(400)])
    assert len(store) == 400
    scores, found = store.search(vectors[:20], 5)
    assert scores.shape == (20, 5)
    assert all(len(row) == 5 for row in found)
    if kind in EXACT:
        assert [row[0] for row in found] == ids[:20]  # each vector is its own nearest neighbour
        assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # sorted best first

    assert store.remove(["item-0", "item-1", "absent"]) == 2
    assert len(store) == 398
    _, found = store.search(vectors[:2], 10)
    assert not {"item-0", "item-1"} & {i for row in found for i in row}

    store = reopen(kind, store)
    assert len(store) == 398
    assert store.get_metadata("item-5")["n"] == 5
    assert store.get_metadata("item-0") is None
    _, found = store.search(vectors[:2], 10)
    assert not {"item-0", "item-1"} & {i for row in found for i in row}

    store.add(["new"], vectors[:1], [{"n": -1}])  # incremental add after reopening
    _, found = store.search(vectors[:1], 1)
    if kind in EXACT:
        assert found[0] == ["new"]
    store = reopen(kind, store)
    assert len(store) == 399


@pytest.mark.parametrize("kind", STORES)
def test_readding_an_id_replaces_it(kind, tmp_path, request):
    vectors = unit_vectors(50)
    store = make_store(kind, tmp_path / "index", request)
    store.add([str(i) for i in range(50)], vectors)
    store.add(["3"], vectors[10:11], [{"v": 2}])
    assert len(store) == 50
    assert store.get_metadata("3")["v"] == 2


@pytest.mark.parametrize("kind", STORES)
def test_bad_vectors_are_refused(kind, tmp_path, request):
    store = make_store(kind, tmp_path / "index", request)
    with pytest.raises(ValueError, match=r"shape \[N, 16\]"):
        store.add(["a"], np.zeros((1, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        store.add(["a"], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="duplicate"):
        store.add(["a", "a"], unit_vectors(2))
    # one metadata entry short: refused whole, where zip() once dropped the last item's metadata
    # and left its vector in the index under no id
    with pytest.raises(ValueError, match="1 metadata entries for 2 ids"):
        store.add(["a", "b"], unit_vectors(2), [{"n": 0}])
    assert len(store) == 0


def test_k_larger_than_catalog_returns_everything(tmp_path):
    store = FaissStore(tmp_path / "index", DIM)
    store.add(["a", "b"], unit_vectors(2))
    scores, found = store.search(unit_vectors(1), 50)
    assert sorted(found[0]) == ["a", "b"] and scores.shape == (1, 2)


def test_open_refuses_what_is_not_an_index(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(StoreError, match="no manifest.json"):
        FaissStore.open(tmp_path / "x")


def test_failure_while_writing_keeps_previous_index(tmp_path, monkeypatch):
    path = tmp_path / "index"
    store = FaissStore(path, DIM)
    store.add(["a"], unit_vectors(1))
    store.save()
    store.add(["b"], unit_vectors(1, seed=1))
    import fashion_retrieval.index.faiss_store as module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_file_synced", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save()
    monkeypatch.undo()
    assert len(FaissStore.open(path)) == 1
    assert not list(tmp_path.glob("index.tmp-*"))


def test_crash_between_the_two_renames_rolls_back(tmp_path):
    path = tmp_path / "index"
    store = FaissStore(path, DIM)
    store.add(["a"], unit_vectors(1))
    store.save()
    path.rename(tmp_path / "index.old")  # the state right after the first rename of a swap
    assert len(FaissStore.open(path)) == 1


def _add_forever(path: str, ready) -> None:
    store = FaissStore.open(path)
    rng = np.random.default_rng(1)
    count = 0
    while True:
        vectors = rng.standard_normal((2000, DIM)).astype(np.float32)
        store.add([f"x{count + i}" for i in range(2000)], vectors)
        count += 2000
        store.save()
        ready.set()


def test_sigkill_during_incremental_adds_leaves_a_loadable_index(tmp_path):
    path = tmp_path / "index"
    store = FaissStore(path, DIM)
    store.add(["a"], unit_vectors(1))
    store.save()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    process = ctx.Process(target=_add_forever, args=(str(path), ready))
    process.start()
    assert ready.wait(60)
    os.kill(process.pid, signal.SIGKILL)  # lands at an arbitrary point of some save()
    process.join()
    reopened = FaissStore.open(path)
    assert len(reopened) >= 2001 and (len(reopened) - 1) % 2000 == 0
    assert reopened.search(unit_vectors(1), 1)[1][0]
    recover(path)
    assert not list(tmp_path.glob("index.tmp-*")) and not (tmp_path / "index.old").exists()


TORCH_PATCHED_SEARCH = """
import sys
import numpy as np
import faiss.contrib.torch_utils  # noqa: F401  (the patch is the point of this test)
from fashion_retrieval.index.faiss_store import FaissStore

vectors = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
for kind in ("hnsw", "ivf"):
    store = FaissStore(sys.argv[1] + kind, 16, kind)
    store.add([f"item-{i}" for i in range(100)], vectors, [{} for _ in range(100)])
    assert store.remove(["item-0"]) == 1
    _, found = store.search(vectors[:1], 5)
    assert "item-0" not in found[0] and len(found[0]) == 5, (kind, found)
print("ok")
"""


def test_hnsw_removal_survives_faiss_torch_patch(tmp_path):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search
    with a wrapper that has no `params`; filtered HNSW (and IVF) search must still work after it.
    In a child process: the patch is global, and milvus-lite's own FAISS searches in this
    process would break under it."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", TORCH_PATCHED_SEARCH, str(tmp_path / "index-")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---- integrity: what open refuses, naming the file (format 1 first, as the code before segments wrote it) -----------------------------------------------
def saved_flat(path, n: int = 50) -> FaissStore:
    store = FaissStore(path, DIM)
    store.add([f"item-{i}" for i in range(n)], unit_vectors(n), [{"n": i} for i in range(n)])
    store.save()
    return store


def legacy_flat(path, n: int = 50) -> Path:
    """A flat store exactly as format 1 wrote it (the code before segments): one index.faiss, one
    metadata.jsonl and a manifest.json with their sizes and sha256."""
    import hashlib

    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(unit_vectors(n), np.arange(n, dtype=np.int64))
    files = {"index.faiss": faiss.serialize_index(index).tobytes(),
             "metadata.jsonl": "".join(json.dumps({"n": i, "id": f"item-{i}", "iid": i}) + "\n"
                                       for i in range(n)).encode()}
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {"format_version": 1, "store": "faiss", "kind": "flat", "dim": DIM, "count": n, "next_iid": n,
                "nlist": None, "pq_m": 16, "hnsw_m": 32, "info": {},
                "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in files.items()}}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


def edit_manifest(path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (path / "manifest.json").write_text(json.dumps(manifest))


def flip_byte(file, offset: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def test_one_flipped_byte_in_the_faiss_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "index"
    legacy_flat(path)
    flip_byte(path / "index.faiss")  # inside the vectors: FAISS itself would load it without a word
    with pytest.raises(StoreError, match=r"index\.faiss: sha256 differs from the one manifest\.json records"):
        FaissStore.open(path)
    # without the sha256 (verify=False) the size still matches, and the counts agree: it loads
    assert len(FaissStore.open(path, verify=False)) == 50


def test_truncated_metadata_is_refused_naming_it(tmp_path):
    path = tmp_path / "index"
    legacy_flat(path)
    metadata = path / "metadata.jsonl"
    lines = metadata.read_text().splitlines(keepends=True)
    metadata.write_text("".join(lines[:-3]))  # cut at a line boundary: every remaining line parses
    with pytest.raises(StoreError, match=r"metadata\.jsonl: \d+ bytes, but manifest\.json records \d+ \(truncated"):
        FaissStore.open(path)
    edit_manifest(path, files=None)  # an index written before checksums: the count check still catches it
    with pytest.raises(StoreError, match=r"metadata\.jsonl: 47 rows, but manifest\.json records count 50"):
        FaissStore.open(path)


@pytest.mark.parametrize("change, message", [
    ({"count": 49}, r"metadata\.jsonl: 50 rows, but manifest\.json records count 49"),
    ({"dim": DIM * 2}, r"index\.faiss: vectors of 16 dimensions, but manifest\.json records dim 32"),
    ({"next_iid": 10}, r"metadata\.jsonl:11: iid 10 outside 0\.\.next_iid \(10\)"),
    ({"count": "50"}, r"manifest\.json: 'count' must be integer, got '50'"),
    ({"dim": None}, r"manifest\.json: missing 'dim'"),
    ({"files": {"index.faiss": {"size": 1}}}, r"manifest\.json: 'files' must list metadata\.jsonl"),
])
def test_a_manifest_that_disagrees_with_its_files_is_refused(tmp_path, change, message):
    path = tmp_path / "index"
    legacy_flat(path)
    edit_manifest(path, **change)
    with pytest.raises(StoreError, match=message):
        FaissStore.open(path)


def test_faiss_vectors_and_metadata_rows_must_agree(tmp_path):
    """Two stores' files mixed (a bad restore): sizes and counts of the manifest's own files are
    consistent, so only the cross-checks between index.faiss and metadata.jsonl can tell."""
    path = tmp_path / "index"
    legacy_flat(path, 50)
    other = legacy_flat(tmp_path / "other", 60)
    (path / "index.faiss").write_bytes((other / "index.faiss").read_bytes())
    edit_manifest(path, files=None)
    with pytest.raises(StoreError, match=r"index\.faiss: 60 vectors, but manifest\.json records count 50"):
        FaissStore.open(path)


def test_metadata_lines_are_checked_by_line(tmp_path):
    path = tmp_path / "index"
    legacy_flat(path)
    edit_manifest(path, files=None)
    metadata = path / "metadata.jsonl"
    lines = metadata.read_text().splitlines(keepends=True)
    for bad, message in [('{"id": "x"}\n', r"metadata\.jsonl:3: missing 'iid'"),
                         ("[1, 2]\n", r"metadata\.jsonl:3: expected a JSON object, got array"),
                         ("{not json\n", r"metadata\.jsonl:3: corrupt JSON line"),
                         (lines[0], r"metadata\.jsonl:3: id 'item-0' or iid 0 appears twice")]:
        metadata.write_text("".join([*lines[:2], bad, *lines[3:]]))
        with pytest.raises(StoreError, match=message):
            FaissStore.open(path)


def test_a_store_without_checksums_opens_and_says_so_once(tmp_path, caplog):
    path = tmp_path / "index"
    legacy_flat(path)
    edit_manifest(path, files=None)
    with caplog.at_level("WARNING", logger="fashion_retrieval.index.faiss_store"):
        assert len(FaissStore.open(path)) == 50
        assert len(FaissStore.open(path)) == 50
    assert [r.getMessage() for r in caplog.records].count(
        f"{path}: written before index files carried checksums: only counts are checked; "
        "the next save (index add/remove) records them") == 1
    FaissStore.open(path).save()  # the next save records them, in the manifest of format 2 it migrates to
    assert set(json.loads((path / "manifest-000001.json").read_text())["files"]) == {"index.faiss", "metadata.jsonl"}
    assert not (path / "manifest.json").exists()


# ---- format 2: saves write segments ---------------------------------------------------------------
def files_of(path) -> dict[str, tuple[int, int]]:
    """name → (inode, size): a file rewritten or replaced gets another inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in path.iterdir()}


def test_a_format_1_store_is_migrated_by_its_first_save_without_rewriting_it(tmp_path):
    path = legacy_flat(tmp_path / "index", 50)
    before = files_of(path)
    store = FaissStore.open(path)
    store.add(["new"], unit_vectors(1, seed=9), [{"n": -1}])
    assert store.remove(["item-3"]) == 1
    store.save()
    after = files_of(path)
    assert after["index.faiss"] == before["index.faiss"] and after["metadata.jsonl"] == before["metadata.jsonl"]
    assert set(after) == {"index.faiss", "metadata.jsonl", "manifest-000001.json", "seg-000001.vec", "seg-000001.jsonl"}
    assert after["seg-000001.vec"][1] == 8 + 8 + 4 * DIM  # one id added, one removed, one vector
    reopened = FaissStore.open(path)
    assert len(reopened) == 50 and reopened.get_metadata("new")["n"] == -1 and "item-3" not in reopened
    assert reopened.search(unit_vectors(1, seed=9), 1)[1] == [["new"]]
    assert reopened.search(unit_vectors(50)[4:5], 1)[1] == [["item-4"]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_a_save_writes_only_what_changed_and_compacts_now_and_then(kind, tmp_path, monkeypatch):
    import fashion_retrieval.index.faiss_store as module

    monkeypatch.setattr(module, "MAX_SEGMENTS", 3)
    path = tmp_path / "index"
    vectors = unit_vectors(2000)
    store = FaissStore(path, DIM, kind)
    store.add([f"item-{i}" for i in range(2000)], vectors, [{"n": i} for i in range(2000)])
    store.save()
    base = files_of(path)
    expected = {f"item-{i}" for i in range(2000)}
    for step in range(1, 4):  # three saves of 10 new items and one removal: three segments
        new = [f"new-{step}-{i}" for i in range(10)]
        store.add(new, unit_vectors(10, seed=step), [{"step": step}] * 10)
        store.remove([f"item-{step}"])
        store.save()
        expected = (expected | set(new)) - {f"item-{step}"}
        now = files_of(path)
        assert {name: now[name] for name in base if name.startswith("base-")} == \
            {name: info for name, info in base.items() if name.startswith("base-")}  # never rewritten
        assert now[f"seg-{step + 1:06d}.vec"][1] == 10 * (8 + 4 * DIM) + 8
        assert now[f"seg-{step + 1:06d}.jsonl"][1] < 10 * 200  # the ten new rows, not the catalog's
        reopened = FaissStore.open(path)
        assert {m["id"] for m in reopened.items()} == expected
    store.add(["last"], unit_vectors(1, seed=99))
    store.save()  # a fourth segment would pass MAX_SEGMENTS: a new base instead
    assert sorted(p.name for p in path.iterdir()) == ["base-000005.faiss", "base-000005.jsonl", "manifest-000005.json"]
    reopened = FaissStore.open(path)
    assert {m["id"] for m in reopened.items()} == expected | {"last"}
    if kind in EXACT:
        assert reopened.search(unit_vectors(1, seed=99), 1)[1] == [["last"]]
        assert reopened.search(vectors[100:101], 1)[1] == [["item-100"]]


def test_a_writer_that_opened_an_older_generation_is_refused(tmp_path):
    path = tmp_path / "index"
    saved_flat(path)
    first, second = FaissStore.open(path), FaissStore.open(path)
    first.add(["a"], unit_vectors(1))
    first.save()
    second.add(["b"], unit_vectors(1))
    with pytest.raises(StoreError, match=r"changed on disk by another writer since it was opened \(generation 1 -> 2\)"):
        second.save()
    assert "a" in FaissStore.open(path) and "b" not in FaissStore.open(path)


def saved_with_segment(path) -> Path:
    store = saved_flat(path)
    store.add(["x", "y"], unit_vectors(2, seed=5), [{}, {}])
    store.remove(["item-0"])
    store.save()
    return path / "manifest-000002.json"


def test_a_flipped_byte_in_a_segment_is_refused_naming_it(tmp_path):
    manifest = saved_with_segment(tmp_path / "index")
    flip_byte(tmp_path / "index" / "seg-000002.vec", 40)
    with pytest.raises(StoreError, match=r"seg-000002\.vec: sha256 differs from the one manifest-000002\.json records"):
        FaissStore.open(tmp_path / "index")
    assert manifest.is_file()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["segments"][0].update(added=3), r"seg-000002\.vec: \d+ bytes, but 3 added and 1 removed vectors of dim 16 take"),
    (lambda m: m["segments"][0].update(removed=0, added=2), r"seg-000002\.vec: \d+ bytes, but 2 added and 0 removed"),
    (lambda m: m.update(count=52), r"51 items after replaying the segments, but manifest-000002\.json records count 52"),
    (lambda m: m["base"].update(count=49), r"base-000001\.jsonl: 50 rows, but manifest-000002\.json \(base\) records count 49"),
    (lambda m: m["segments"][0].update(vectors="../../etc/passwd"), r"'\.\./\.\./etc/passwd' is not a file name this store writes"),
    (lambda m: m["files"].pop("seg-000002.jsonl"), r"'files' does not list seg-000002\.jsonl"),
    (lambda m: m.update(next_iid=51), r"seg-000002\.jsonl:2: iid 51 outside 0\.\.next_iid \(51\)"),
])
def test_a_format_2_manifest_that_disagrees_with_its_files_is_refused(tmp_path, edit, message):
    manifest_path = saved_with_segment(tmp_path / "index")
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    if "files" in manifest and "seg-000002.vec" in manifest["files"]:  # sizes follow the edit: only the counts disagree
        vec = tmp_path / "index" / "seg-000002.vec"
        manifest["files"]["seg-000002.vec"]["size"] = vec.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=message):
        FaissStore.open(tmp_path / "index", verify=False)


def test_segment_ids_must_match_its_metadata_rows(tmp_path):
    saved_with_segment(tmp_path / "index")
    rows = (tmp_path / "index" / "seg-000002.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "index" / "seg-000002.jsonl").write_text("".join(reversed(rows)))  # same bytes, other order
    with pytest.raises(StoreError, match=r"seg-000002\.vec: its ids differ from the rows of seg-000002\.jsonl"):
        FaissStore.open(tmp_path / "index", verify=False)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "milvus"])
def test_vectors_of_gives_the_stored_vectors(kind, tmp_path, request):
    """What search's query expansion reads back: each id's own vector, after a reopen too."""
    vectors = unit_vectors(300, seed=4)
    ids = [f"v{i}" for i in range(300)]
    store = make_store(kind, tmp_path / "index", request)
    store.add(ids, vectors)
    wanted = ["v7", "v0", "v299"]
    exact = kind != "ivfpq"  # product quantisation keeps codes: its vectors come back approximate
    for reopened in (False, True):
        current = reopen(kind, store) if reopened else store
        got = current.vectors_of(wanted)
        assert got.shape == (3, DIM) and got.dtype == np.float32
        np.testing.assert_allclose(got, vectors[[7, 0, 299]], atol=1e-5 if exact else 0.5)
        if not exact:  # approximate, yet nearer its own vector than any other
            assert [int(np.argmax(vectors @ row)) for row in got] == [7, 0, 299]
        assert current.vectors_of([]).shape == (0, DIM)
