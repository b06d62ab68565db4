"""FAISS vector store: one directory of immutable files, named by a manifest per generation.

Layout of ``DIR`` (format 2)::

    manifest-000007.json  generation 7: kind, dim, count, next internal id, user info, the base
                          and segments below, and the size and sha256 of every file it names
    base-000003.faiss     faiss.IndexIDMap2 of every vector at the last compaction (generation 3)
    base-000003.jsonl     one line per vector of the base: {"id", "iid", ...metadata}
    seg-000004.vec        one save's change: int64 ids added [a], int64 ids removed [r], then
                          float32 vectors [a, dim]
    seg-000004.jsonl      metadata rows of the ids added, in the same order

A save writes only what changed since the last one (a segment: O(batch) bytes), then a new
manifest (tmp, fsync, rename): the rename is the commit. Files are never modified once written;
those no manifest names any more are deleted after the commit. When segments pile up
(``MAX_SEGMENTS``) or removed vectors pass ``MAX_DEAD_FRACTION`` of those stored, a save writes a
new base instead (compaction: O(catalog), once in a while). ``open`` loads the base and replays
the segments; every file is checked against its size and sha256, each segment's size against
its counts and the dim, and the vectors against the metadata rows.

A store written by the previous format (``manifest.json``, ``index.faiss``, ``metadata.jsonl``)
opens as before; its first save migrates it by naming those two files as the base of a
format-2 manifest (no rewrite). A brand-new store (never saved) is written to ``DIR.tmp-*`` and
swapped in with two renames, as every save was before. A catalog (``catalog.py``) commits all
of its spaces at once: it names the generation each space must be read at.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from ..files import one_line, quote, read_json, read_jsonl, require_keys
from .filters import MetadataPostings, SearchFilter
from .store import (StoreError, VectorStore, check_add, check_vectors, file_record, file_sha256, fsync_dir, guard, recover,
                    swap_in, verify_file, verify_size, write_file_synced)

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
FORMAT_VERSION = 2
LEGACY_FORMAT = 1  # one index.faiss + metadata.jsonl, rewritten whole by every save
MARKER = "manifest*.json"  # every store directory holds one: a folder without it is not ours
MIN_TRAIN_PER_LIST = 39  # FAISS warns below this many training points per IVF list
MANIFEST_FILE, INDEX_FILE, METADATA_FILE = "manifest.json", "index.faiss", "metadata.jsonl"  # format 1
# a save compacts (writes a new base) when it would leave more segments than this, or more
# removed-but-stored vectors than this fraction of those stored (and at least MIN_DEAD)
MAX_SEGMENTS = 32
MAX_DEAD_FRACTION = 0.25
MIN_DEAD = 1000
GENERATION_DIGITS = 6
MANIFEST_NAME = re.compile(r"manifest-(\d{6,})\.json")
# the only file names a manifest may list (names read from a file never become paths otherwise)
DATA_FILE_NAME = re.compile(r"(?:base-\d{6,}\.(?:faiss|jsonl)|seg-\d{6,}\.(?:vec|jsonl)|index\.faiss|metadata\.jsonl)")
OURS = re.compile(rf"{DATA_FILE_NAME.pattern}|manifest-\d{{6,}}\.json(?:\.tmp)?|manifest\.json")

_log = logging.getLogger(__name__)
_unverified: set[str] = set()  # stores without checksums already reported in this process


def manifest_name(generation: int) -> str:
    return f"manifest-{generation:0{GENERATION_DIGITS}d}.json"


def _numbered(prefix: str, generation: int, suffix: str) -> str:
    return f"{prefix}-{generation:0{GENERATION_DIGITS}d}{suffix}"


def committed_generations(path: Path) -> list[int]:
    """Generations whose manifest is in ``path`` (a manifest appears by rename: complete or absent)."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(MANIFEST_NAME.fullmatch, names) if m)


class FaissStore(VectorStore):
    def __init__(self, path: str | Path, dim: int, kind: str = "flat", info: dict[str, Any] | None = None,
                 nlist: int | None = None, pq_m: int = 16, hnsw_m: int = 32):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind '{kind}'; choose one of {', '.join(KINDS)}")
        self.path = Path(path)
        self.dim = dim
        self.kind = kind
        self.info = dict(info or {})
        self.nlist, self.pq_m, self.hnsw_m = nlist, pq_m, hnsw_m
        self._index: faiss.IndexIDMap2 | None = None
        self._meta: dict[str, dict[str, Any]] = {}  # id → metadata (with "iid")
        self._by_iid: dict[int, str] = {}
        self._tombstones: set[int] = set()  # HNSW cannot delete: removed ids are filtered at search
        self._postings: MetadataPostings | None = None  # filter postings, built at the first filtered search
        self._next_iid = 0
        self.ef_search = 64
        self.nprobe = 16
        # the folder this store must stay inside (a catalog's spaces/); default: its parent
        self.owner: Path | None = None
        # what is on disk: the generation this object was read at or last wrote (None: never
        # saved), its manifest, and the changes made in memory since (what the next save writes)
        self.generation: int | None = None
        self._manifest: dict[str, Any] | None = None
        self._pending: dict[int, np.ndarray] = {}  # iid → vector, added since the last save
        self._pending_removed: list[int] = []  # iids on disk removed since the last save

    # ---- building -----------------------------------------------------------------------
    def _make_index(self, train_vectors: np.ndarray) -> faiss.IndexIDMap2:
        kind = self.kind
        n = len(train_vectors)
        nlist = self.nlist or max(1, min(int(4 * np.sqrt(max(n, 1))), n // MIN_TRAIN_PER_LIST))
        if kind in ("ivf", "ivfpq") and nlist < 4:
            kind = "flat"  # too few vectors to train a coarse quantiser: exact search is cheaper anyway
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivf":
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = self.pq_m if self.dim % self.pq_m == 0 else 1
            # 8-bit codes need 256·39 training points per sub-quantiser; small catalogs get fewer bits
            nbits = int(max(4, min(8, np.log2(max(n, 1) / MIN_TRAIN_PER_LIST))))
            inner = faiss.IndexIVFPQ(faiss.IndexFlatIP(self.dim), self.dim, nlist, m, nbits,
                                     faiss.METRIC_INNER_PRODUCT)
        if not inner.is_trained:
            inner.train(train_vectors)
        self.effective_kind = kind
        return faiss.IndexIDMap2(inner)

    def add(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict[str, Any]] | None = None) -> None:
        ids, vectors, metadata = check_add(ids, vectors, metadata, self.dim)
        present = [i for i in ids if i in self._meta]
        if present:
            self.remove(present)
        if self._index is None:
            self._index = self._make_index(vectors)
        iids = np.arange(self._next_iid, self._next_iid + len(ids), dtype=np.int64)
        self._next_iid += len(ids)
        self._index.add_with_ids(vectors, iids)
        self._postings = None
        for item_id, iid, meta, vector in zip(ids, iids.tolist(), metadata, vectors):
            self._meta[item_id] = {**meta, "id": item_id, "iid": iid}
            self._by_iid[iid] = item_id
            self._pending[iid] = vector

    def remove(self, ids: Sequence[str]) -> int:
        iids = [self._meta[i]["iid"] for i in map(str, ids) if i in self._meta]
        if not iids:
            return 0
        if self._uses_tombstones:
            self._tombstones.update(iids)
        else:
            self._index.remove_ids(np.asarray(iids, dtype=np.int64))
        for iid in iids:
            del self._meta[self._by_iid.pop(iid)]
            if self._pending.pop(iid, None) is None:  # added before the last save: on disk
                self._pending_removed.append(iid)
        self._postings = None
        return len(iids)

    @property
    def _uses_tombstones(self) -> bool:
        # HNSW cannot delete; IVF can, but not under IndexIDMap2, whose id map assumes that a
        # removal shifts the later vectors down (FAISS aborts on the second removal)
        return isinstance(faiss.downcast_index(self._index.index), (faiss.IndexHNSW, faiss.IndexIVF))

    # ---- querying -----------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int, where: SearchFilter | None = None) -> tuple[np.ndarray, list[list[str]]]:
        vectors = check_vectors(vectors, self.dim, "query vectors")
        if k < 1:
            raise ValueError("k must be at least 1")
        allowed = None if where is None else self._allowed(where)
        k = min(k, len(self) if allowed is None else len(allowed))
        if k == 0:
            return np.zeros((len(vectors), 0), np.float32), [[] for _ in vectors]
        scores, iids = self._search(vectors, k, allowed)
        if allowed is not None and (iids[:, -1] < 0).any():
            # IVF and HNSW only visit part of the catalog: with a selective filter they can find
            # fewer than the k matches there are. Search the matches exhaustively instead.
            scores, iids = self._search(vectors, k, allowed, exhaustive=True)
        ids = [[self._by_iid[i] for i in row if i >= 0] for row in iids.tolist()]
        return scores, ids

    def _search(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None,
                exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        inner = faiss.downcast_index(self._index.index)
        if exhaustive and isinstance(inner, faiss.IndexHNSW):
            # a graph walk may never reach a match: score the matches' own vectors instead
            matches = np.stack([self._index.reconstruct(int(i)) for i in allowed])
            scores = vectors @ matches.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, order, 1).astype(np.float32), allowed[order]
        excluded = self._tombstones if allowed is None else ()  # allowed ids are never tombstoned
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
        elif excluded:
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(excluded, np.int64)))
        params = None
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = max(self.ef_search, k)
            if selector is not None:
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))
        elif isinstance(inner, faiss.IndexIVF):
            nprobe = inner.nlist if exhaustive else min(self.nprobe, inner.nlist)
            inner.nprobe = min(self.nprobe, inner.nlist)
            if selector is not None:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        elif selector is not None:
            params = faiss.SearchParameters(sel=selector)
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning) swaps `search` for a
        # wrapper without `params`; `search_numpy`, when present, is faiss's own numpy method.
        search = getattr(self._index, "search_numpy", self._index.search)
        scores, iids = search(vectors, k, params=params) if params else search(vectors, k)
        del selector  # the parameters point at it: it must outlive the search, not more
        return scores, iids

    def _allowed(self, where: SearchFilter) -> np.ndarray:
        """Internal ids of the items ``where`` accepts, from postings kept until the next change."""
        if self._postings is None:
            self._postings = MetadataPostings((meta["iid"], item_id, meta) for item_id, meta in self._meta.items())
        return self._postings.allowed(where)

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors of present ids (``ivfpq``: decoded from its codes, approximate)."""
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexIVF):
            inner.make_direct_map()  # reconstruct by id needs it; kept from then on
        return np.stack([self._index.reconstruct(int(self._meta[str(i)]["iid"])) for i in ids]).astype(np.float32)

    def get_metadata(self, item_id: str) -> dict[str, Any] | None:
        meta = self._meta.get(str(item_id))
        return None if meta is None else {k: v for k, v in meta.items() if k != "iid"}

    def items(self) -> list[dict[str, Any]]:
        return [self.get_metadata(i) for i in self._meta]

    def __len__(self) -> int:
        return len(self._meta)

    # ---- persistence --------------------------------------------------------------------
    def _compact(self) -> None:
        """Rebuild without tombstoned vectors (HNSW, IVF), so they stop costing memory and time
        (IVF kinds are retrained on the vectors they keep; ivfpq's are decoded from its codes)."""
        keep = sorted(self._by_iid)
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexIVF):
            inner.make_direct_map()  # IVF reconstructs by id only through a direct map
        vectors = np.stack([self._index.reconstruct(i) for i in keep]) if keep else np.zeros((0, self.dim), np.float32)
        self._index = self._make_index(vectors) if keep else None
        if keep:
            self._index.add_with_ids(vectors, np.asarray(keep, dtype=np.int64))
        self._tombstones.clear()

    @property
    def dirty(self) -> bool:
        """Changes in memory that no save has written yet."""
        return bool(self._pending or self._pending_removed) or self.generation is None

    def _stored(self, manifest: dict[str, Any] | None) -> int:
        """Vectors the files of ``manifest`` hold, removed ones included."""
        if manifest is None:
            return 0
        base = manifest["base"]["count"] if manifest.get("base") else 0
        return base + sum(segment["added"] for segment in manifest.get("segments", []))

    def _needs_compaction(self) -> bool:
        manifest = self._manifest
        if manifest is None or manifest.get("base") is None:
            # no base on disk: the index (trained on its first batch, for IVF) is written whole
            return self._index is not None
        segments = len(manifest["segments"]) + bool(self._pending or self._pending_removed)
        stored = self._stored(manifest) + len(self._pending)
        dead = stored - len(self._meta)
        return segments > MAX_SEGMENTS or dead > max(MIN_DEAD, MAX_DEAD_FRACTION * stored)

    def _manifest_for(self, generation: int, base: dict | None, segments: list, files: dict) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "store": "faiss", "generation": generation, "kind": self.kind,
                "dim": self.dim, "count": len(self), "next_iid": self._next_iid, "nlist": self.nlist,
                "pq_m": self.pq_m, "hnsw_m": self.hnsw_m, "info": self.info, "base": base, "segments": segments,
                "files": files}

    def _write(self, directory: Path, name: str, data: bytes, files: dict[str, Any]) -> None:
        files[name] = file_record(data)
        write_file_synced(directory / name, data)

    def _write_base(self, directory: Path, generation: int) -> tuple[dict | None, dict[str, Any]]:
        if self._tombstones:
            self._compact()
        files: dict[str, Any] = {}
        if self._index is None:
            return None, files
        index_name, metadata_name = _numbered("base", generation, ".faiss"), _numbered("base", generation, ".jsonl")
        self._write(directory, index_name, faiss.serialize_index(self._index).tobytes(), files)
        rows = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in self._meta.values())
        self._write(directory, metadata_name, rows.encode("utf-8"), files)
        return {"index": index_name, "metadata": metadata_name, "count": len(self._meta)}, files

    def _write_segment(self, directory: Path, generation: int, files: dict[str, Any]) -> dict[str, Any]:
        added = np.fromiter(self._pending, np.int64, len(self._pending))
        removed = np.asarray(self._pending_removed, dtype=np.int64)
        vectors = (np.stack(list(self._pending.values())) if self._pending
                   else np.zeros((0, self.dim), np.float32)).astype(np.float32, copy=False)
        vectors_name, metadata_name = _numbered("seg", generation, ".vec"), _numbered("seg", generation, ".jsonl")
        self._write(directory, vectors_name, added.tobytes() + removed.tobytes() + vectors.tobytes(), files)
        rows = "".join(json.dumps(self._meta[self._by_iid[iid]], ensure_ascii=False) + "\n" for iid in self._pending)
        self._write(directory, metadata_name, rows.encode("utf-8"), files)
        return {"vectors": vectors_name, "metadata": metadata_name, "added": len(added), "removed": len(removed)}

    def write_generation(self, generation: int, directory: Path | None = None) -> dict[str, Any]:
        """Write the files of ``generation`` and its manifest into ``directory`` (default: the
        store's own) and return the manifest; the caller adopts it (:meth:`adopt`) once committed.

        In the store's own directory only what changed since the last save is written (a
        segment), unless it is time to compact; elsewhere (a new build's tmp folder) the whole
        store is written as a base."""
        directory = self.path if directory is None else Path(directory)
        in_place = directory == self.path and self._manifest is not None
        if not in_place or self._needs_compaction():
            base, files = self._write_base(directory, generation)
            segments: list[dict[str, Any]] = []
        else:
            base, segments = self._manifest.get("base"), list(self._manifest["segments"])
            files = self._recorded_files()
            if self._pending or self._pending_removed:
                segments.append(self._write_segment(directory, generation, files))
        manifest = self._manifest_for(generation, base, segments, files)
        target = directory / manifest_name(generation)
        tmp = target.with_name(target.name + ".tmp")
        write_file_synced(tmp, json.dumps(manifest, indent=1).encode("utf-8"))
        os.replace(tmp, target)  # the commit of a store on its own
        fsync_dir(directory)
        return manifest

    def _recorded_files(self) -> dict[str, Any]:
        """Size and sha256 of each file the current manifest names (a store of format 1 written
        before checksums has them computed now, once)."""
        manifest = self._manifest
        files = dict(manifest.get("files") or {})
        names = [manifest["base"]["index"], manifest["base"]["metadata"]] if manifest.get("base") else []
        for name in names:
            if name not in files:
                files[name] = {"size": (self.path / name).stat().st_size, "sha256": file_sha256(self.path / name)}
        return files

    def adopt(self, manifest: dict[str, Any]) -> None:
        """``manifest`` is committed: it is now what this object's state is on disk."""
        self.generation, self._manifest = manifest["generation"], manifest
        self._pending.clear()
        self._pending_removed.clear()

    def referenced_files(self) -> set[str]:
        manifest = self._manifest or {}
        names = set((manifest.get("files") or {}))
        if manifest.get("base"):
            names.update((manifest["base"]["index"], manifest["base"]["metadata"]))
        if self.generation is not None:
            names.add(MANIFEST_FILE if manifest.get("format_version") == LEGACY_FORMAT else manifest_name(self.generation))
        return names

    def collect_garbage(self) -> None:
        """Delete the files of this store that its committed manifest no longer names: the
        previous generations', and those of a save that crashed before its commit. Files of
        other names are not ours and stay."""
        if self._manifest is None or not self.path.is_dir():
            return
        keep = self.referenced_files()
        owner = self.owner if self.owner is not None else self.path.parent
        for name in os.listdir(self.path):
            if OURS.fullmatch(name) and name not in keep:
                guard(self.path / name, owner)
                try:
                    (self.path / name).unlink()
                except FileNotFoundError:
                    pass

    def save(self) -> None:
        """Persist: in place, O(changes), for a store read from disk; whole, by a directory swap,
        for a new one."""
        owner = self.owner if self.owner is not None else self.path.parent
        guard(self.path, owner)
        if self._manifest is not None:
            on_disk = committed_generations(self.path)
            latest = on_disk[-1] if on_disk else (0 if (self.path / MANIFEST_FILE).is_file() else None)
            if latest != self.generation:
                raise StoreError(f"{self.path}: changed on disk by another writer since it was opened "
                                 f"(generation {self.generation} -> {latest}); reopen it and retry")
            self.collect_garbage()  # the leftovers of a save that crashed before its commit
            self.adopt(self.write_generation(self.generation + 1))
            self.collect_garbage()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recover(self.path, owner, MARKER)
        tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".tmp-", dir=self.path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the index from a server run as another user
        try:
            manifest = self.write_generation(1, tmp)
            swap_in(tmp, self.path, owner, MARKER)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            recover(self.path, owner, MARKER)
            raise
        self.adopt(manifest)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, owner: str | Path | None = None,
             generation: int | None = None) -> "FaissStore":
        """Load ``path`` at ``generation`` (default: the latest committed), refusing any file that
        disagrees with the manifest.

        The manifest records each file's size and sha256 (``verify=False`` skips only the
        sha256); each segment's size must match its counts and the dim; the vector count of the
        FAISS index, the metadata rows and the manifest's count and dim must agree. A store of
        format 1 written before checksums were recorded opens with the count checks alone
        (logged once).
        """
        path = Path(path)
        owner = Path(owner) if owner is not None else path.parent
        recover(path, owner, MARKER)
        generations = committed_generations(path)
        if generation is not None and generation in generations:
            manifest_path = path / manifest_name(generation)
        elif generation is None and generations:
            manifest_path = path / manifest_name(generations[-1])
        elif (path / MANIFEST_FILE).is_file():
            manifest_path = path / MANIFEST_FILE  # format 1, or a migration not yet committed
        elif generations:
            raise StoreError(f"{path}: no {manifest_name(generation)}, the generation its index records; "
                             "rebuild the index")
        else:
            raise StoreError(f"{path}: not an index directory (no manifest.json)")
        manifest = read_json(manifest_path, StoreError)
        version = manifest.get("format_version")
        if version not in (LEGACY_FORMAT, FORMAT_VERSION) or manifest.get("store") != "faiss":
            raise StoreError(f"{manifest_path}: not a FAISS index of format {LEGACY_FORMAT} or {FORMAT_VERSION} "
                             f"(found store={quote(manifest.get('store'), 40)}, format={quote(version, 40)})")
        require_keys(manifest, {"dim": int, "kind": str, "count": int, "next_iid": int}, manifest_path, StoreError)
        if manifest["kind"] not in KINDS:
            raise StoreError(f"{manifest_path}: unknown index kind {quote(manifest['kind'], 40)}")
        if not 0 <= manifest["next_iid"] < 2**62:  # FAISS ids are int64: 2**70 was an OverflowError at the next add
            raise StoreError(f"{manifest_path}: next_iid {quote(manifest['next_iid'], 40)} is not a vector id; "
                             "rebuild the index")
        for key, kinds in (("info", (dict, type(None))), ("nlist", (int, type(None))), ("pq_m", int), ("hnsw_m", int)):
            if key in manifest:
                require_keys(manifest, {key: kinds}, manifest_path, StoreError)
        if version == LEGACY_FORMAT:
            manifest = _legacy_as_base(path, manifest, manifest_path, verify)
        else:
            _check_layout(path, manifest, manifest_path, verify)
        store = cls(path, manifest["dim"], manifest["kind"], manifest.get("info"), manifest.get("nlist"),
                    manifest.get("pq_m", 16), manifest.get("hnsw_m", 32))
        store._next_iid = manifest["next_iid"]
        store.owner = owner
        store._load(manifest, manifest_path)
        store.generation, store._manifest = manifest["generation"], manifest
        return store

    def _read_rows(self, file: Path, expected: int, what: str) -> list[int]:
        """Metadata rows of ``file``; returns their iids in order."""
        iids = []
        for line, meta in read_jsonl(file, StoreError):
            if type(meta.get("id")) is not str or type(meta.get("iid")) is not int:  # 100k calls: the cheap test first
                require_keys(meta, {"id": str, "iid": int}, file, StoreError, line)
            if meta["id"] in self._meta or meta["iid"] in self._by_iid:
                raise StoreError(f"{file}:{line}: id {quote(meta['id'], 60)} or iid {meta['iid']} "
                                 "appears twice; rebuild the index")
            if not 0 <= meta["iid"] < self._next_iid:
                raise StoreError(f"{file}:{line}: iid {meta['iid']} outside 0..next_iid "
                                 f"({self._next_iid}) of {what}; rebuild the index")
            self._meta[meta["id"]] = meta
            self._by_iid[meta["iid"]] = meta["id"]
            iids.append(meta["iid"])
        if len(iids) != expected:
            raise StoreError(f"{file}: {len(iids)} rows, but {what} records count {expected}; rebuild the index")
        return iids

    def _load(self, manifest: dict[str, Any], manifest_path: Path) -> None:
        base = manifest.get("base")
        what = manifest_path.name
        if base is not None:
            index_path = self.path / base["index"]
            legacy = manifest.get("format_version") == LEGACY_FORMAT
            rows = self._read_rows(self.path / base["metadata"], base["count"], what if legacy else f"{what} (base)")
            try:
                self._index = faiss.read_index(str(index_path))  # owns its memory: never re-wrap it
            except RuntimeError as exc:
                raise StoreError(f"{index_path}: corrupt FAISS index ({one_line(str(exc).splitlines()[0])})") from None
            if not isinstance(self._index, faiss.IndexIDMap2):
                raise StoreError(f"{index_path}: not an id-mapped FAISS index ({type(self._index).__name__}); "
                                 "rebuild the index")
            if self._index.d != self.dim:
                raise StoreError(f"{index_path}: vectors of {self._index.d} dimensions, but {what} "
                                 f"records dim {self.dim}; rebuild the index")
            if self._index.ntotal != base["count"]:
                raise StoreError(f"{index_path}: {self._index.ntotal} vectors, but {what} records "
                                 f"count {base['count']}; rebuild the index")
            stored = faiss.vector_to_array(self._index.id_map)
            if not np.array_equal(np.sort(stored), np.sort(np.asarray(rows, np.int64))):
                raise StoreError(f"{index_path}: its vector ids differ from those of {base['metadata']}; "
                                 "rebuild the index")
        elif manifest.get("segments"):
            raise StoreError(f"{manifest_path}: segments without a base; rebuild the index")
        dead: list[int] = []
        for segment in manifest.get("segments", []):
            dead.extend(self._replay(segment, what))
        if dead:
            dead_ids = np.asarray(dead, np.int64)
            if self._uses_tombstones:
                self._tombstones.update(dead)
            else:
                self._index.remove_ids(dead_ids)
        if len(self._meta) != manifest["count"]:
            raise StoreError(f"{self.path}: {len(self._meta)} items after replaying the segments, but {what} "
                             f"records count {manifest['count']}; rebuild the index")

    def _replay(self, segment: dict[str, Any], what: str) -> list[int]:
        """Apply one segment to the loaded state; returns the iids it removes."""
        vectors_path = self.path / segment["vectors"]
        added, removed = segment["added"], segment["removed"]
        data = vectors_path.read_bytes()
        expected = 8 * (added + removed) + 4 * self.dim * added
        if len(data) != expected:  # the manifest's size record says the same; this ties it to the counts and dim
            raise StoreError(f"{vectors_path}: {len(data)} bytes, but {added} added and {removed} removed vectors "
                             f"of dim {self.dim} take {expected}; rebuild the index")
        iids = np.frombuffer(data, np.int64, added)
        gone = np.frombuffer(data, np.int64, removed, offset=8 * added)
        vectors = np.frombuffer(data, np.float32, added * self.dim, offset=8 * (added + removed)).reshape(added, self.dim)
        for iid in gone.tolist():
            item_id = self._by_iid.pop(iid, None)
            if item_id is None:
                raise StoreError(f"{vectors_path}: removes iid {iid}, which no earlier file of {what} holds; "
                                 "rebuild the index")
            del self._meta[item_id]
        rows = self._read_rows(self.path / segment["metadata"], added, f"{what} ({segment['vectors']})")
        if rows != iids.tolist():
            raise StoreError(f"{vectors_path}: its ids differ from the rows of {segment['metadata']}; rebuild the index")
        if added:
            self._index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(iids))
        return gone.tolist()

    def vectors(self) -> tuple[list[str], np.ndarray]:
        """Every live id and its stored vector (``ivfpq`` keeps codes, not vectors: refused)."""
        if self._index is None or not self._meta:
            return [], np.zeros((0, self.dim), np.float32)
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexIVFPQ):
            raise StoreError(f"{self.path}: an ivfpq index keeps compressed codes, not the vectors; "
                             "build the new index from the images instead")
        if isinstance(inner, faiss.IndexIVF):
            inner.make_direct_map()
        ids = list(self._meta)
        iids = np.fromiter((self._meta[i]["iid"] for i in ids), np.int64, len(ids))
        return ids, np.stack([self._index.reconstruct(int(i)) for i in iids])


def _check_file_name(name: Any, manifest_path: Path) -> str:
    if not isinstance(name, str) or not DATA_FILE_NAME.fullmatch(name):
        raise StoreError(f"{manifest_path}: {quote(name, 60)} is not a file name this store writes")
    return name


def _check_layout(path: Path, manifest: dict[str, Any], manifest_path: Path, verify: bool) -> None:
    """The manifest of format 2 is well-formed and every file it names has its recorded size
    (and sha256 with ``verify``)."""
    require_keys(manifest, {"generation": int, "segments": list, "files": dict}, manifest_path, StoreError)
    if not (manifest.get("base") is None or isinstance(manifest["base"], dict)):
        raise StoreError(f"{manifest_path}: 'base' must be an object or null")
    names = []
    if manifest.get("base") is not None:
        require_keys(manifest["base"], {"index": str, "metadata": str, "count": int}, f"{manifest_path}: base",
                     StoreError)
        names += [manifest["base"]["index"], manifest["base"]["metadata"]]
    for number, segment in enumerate(manifest["segments"]):
        if not isinstance(segment, dict):
            raise StoreError(f"{manifest_path}: segments[{number}] must be an object")
        require_keys(segment, {"vectors": str, "metadata": str, "added": int, "removed": int},
                     f"{manifest_path}: segments[{number}]", StoreError)
        names += [segment["vectors"], segment["metadata"]]
    files = manifest["files"]
    for name in names:
        _check_file_name(name, manifest_path)
        if name not in files:
            raise StoreError(f"{manifest_path}: 'files' does not list {name}; rebuild the index")
        (verify_file if verify else verify_size)(path / name, files[name], manifest_path)


def _legacy_as_base(path: Path, manifest: dict[str, Any], manifest_path: Path, verify: bool) -> dict[str, Any]:
    """A format-1 manifest, checked as before, in the shape of format 2: its two files are the base."""
    index_path, metadata_path = path / INDEX_FILE, path / METADATA_FILE
    files = manifest.get("files")
    if files is None and str(path) not in _unverified:
        _unverified.add(str(path))
        _log.warning("%s: written before index files carried checksums: only counts are checked; "
                     "the next save (index add/remove) records them", path)
    elif files is None:
        pass
    elif not isinstance(files, dict) or METADATA_FILE not in files:
        raise StoreError(f"{manifest_path}: 'files' must list {METADATA_FILE} (and {INDEX_FILE}) with size and sha256")
    else:
        for file in (index_path, metadata_path):
            if file.name in files:
                (verify_file if verify else verify_size)(file, files[file.name], manifest_path)
            elif file.exists():
                raise StoreError(f"{file}: not listed in {manifest_path.name}; rebuild the index")
    count = manifest["count"]
    if not index_path.exists():
        if count:
            raise StoreError(f"{index_path}: file not found, but {manifest_path.name} records {count} vectors")
        rows = sum(1 for _ in read_jsonl(metadata_path, StoreError))
        if rows:
            raise StoreError(f"{metadata_path}: {rows} rows, but {manifest_path.name} records count 0; "
                             "rebuild the index")
        base = None
    else:
        base = {"index": INDEX_FILE, "metadata": METADATA_FILE, "count": count}
    return {**manifest, "generation": 0, "base": base, "segments": [],
            "files": {k: v for k, v in (files or {}).items() if k in (INDEX_FILE, METADATA_FILE)}}
