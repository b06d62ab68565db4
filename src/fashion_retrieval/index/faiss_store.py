"""FAISS vector store: one directory holding the index, its metadata and a manifest.

Layout of ``DIR``::

    manifest.json     kind, dim, count, next internal id, user info (model identity…), and the
                      size and sha256 of the two files below, checked on open
    index.faiss       faiss.IndexIDMap2 over an inner-product index
    metadata.jsonl    one line per vector: {"id", "iid", ...metadata}

Writes are atomic at the directory level: the new state is written to ``DIR.tmp-*``, fsynced,
then swapped in with two renames (``DIR`` → ``DIR.old``, ``DIR.tmp-*`` → ``DIR``). ``open``
finishes or rolls back an interrupted swap, so a crash at any point leaves a loadable index.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from ..files import one_line, quote, read_json, read_jsonl, require_keys
from .filters import MetadataPostings, SearchFilter
from .store import (StoreError, VectorStore, check_vectors, file_record, guard, recover, swap_in, verify_file,
                    verify_size, write_file_synced)

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
FORMAT_VERSION = 1
MARKER = "manifest.json"  # every store directory holds one: a folder without it is not ours
MIN_TRAIN_PER_LIST = 39  # FAISS warns below this many training points per IVF list
MANIFEST_FILE, INDEX_FILE, METADATA_FILE = "manifest.json", "index.faiss", "metadata.jsonl"

_log = logging.getLogger(__name__)
_unverified: set[str] = set()  # stores without checksums already reported in this process


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
        ids = [str(i) for i in ids]
        vectors = check_vectors(vectors, self.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in one add call")
        metadata = list(metadata) if metadata is not None else [{} for _ in ids]
        present = [i for i in ids if i in self._meta]
        if present:
            self.remove(present)
        if self._index is None:
            self._index = self._make_index(vectors)
        iids = np.arange(self._next_iid, self._next_iid + len(ids), dtype=np.int64)
        self._next_iid += len(ids)
        self._index.add_with_ids(vectors, iids)
        self._postings = None
        for item_id, iid, meta in zip(ids, iids.tolist(), metadata):
            self._meta[item_id] = {**meta, "id": item_id, "iid": iid}
            self._by_iid[iid] = item_id

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
        self._postings = None
        return len(iids)

    @property
    def _uses_tombstones(self) -> bool:
        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexHNSW)

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

    def get_metadata(self, item_id: str) -> dict[str, Any] | None:
        meta = self._meta.get(str(item_id))
        return None if meta is None else {k: v for k, v in meta.items() if k != "iid"}

    def items(self) -> list[dict[str, Any]]:
        return [self.get_metadata(i) for i in self._meta]

    def __len__(self) -> int:
        return len(self._meta)

    # ---- persistence --------------------------------------------------------------------
    def _compact(self) -> None:
        """Rebuild without tombstoned vectors (HNSW), so they stop costing memory and time."""
        keep = sorted(self._by_iid)
        vectors = np.stack([self._index.reconstruct(i) for i in keep]) if keep else np.zeros((0, self.dim), np.float32)
        self._index = self._make_index(vectors) if keep else None
        if keep:
            self._index.add_with_ids(vectors, np.asarray(keep, dtype=np.int64))
        self._tombstones.clear()

    def save(self) -> None:
        if self._tombstones:
            self._compact()
        owner = self.owner if self.owner is not None else self.path.parent
        guard(self.path, owner)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recover(self.path, owner, MARKER)
        tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".tmp-", dir=self.path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the index from a server run as another user
        try:
            files = {}
            if self._index is not None:
                data = faiss.serialize_index(self._index).tobytes()
                files[INDEX_FILE] = file_record(data)
                write_file_synced(tmp / INDEX_FILE, data)
            data = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in self._meta.values()).encode("utf-8")
            files[METADATA_FILE] = file_record(data)
            write_file_synced(tmp / METADATA_FILE, data)
            manifest = {
                "format_version": FORMAT_VERSION, "store": "faiss", "kind": self.kind, "dim": self.dim,
                "count": len(self), "next_iid": self._next_iid, "nlist": self.nlist, "pq_m": self.pq_m,
                "hnsw_m": self.hnsw_m, "info": self.info, "files": files,
            }
            # the manifest is written last: a directory without one is never a complete index
            write_file_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode("utf-8"))
            swap_in(tmp, self.path, owner, MARKER)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            recover(self.path, owner, MARKER)
            raise

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, owner: str | Path | None = None) -> "FaissStore":
        """Load ``path``, refusing any file that disagrees with the manifest.

        The manifest records each file's size and sha256 (``verify=False`` skips only the
        sha256); the vector count of the FAISS index, the metadata rows and the manifest's
        count and dim must agree. A store written before checksums were recorded opens with
        the count checks alone (logged once).
        """
        path = Path(path)
        owner = Path(owner) if owner is not None else path.parent
        recover(path, owner, MARKER)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise StoreError(f"{path}: not an index directory (no manifest.json)")
        manifest = read_json(manifest_path, StoreError)
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("store") != "faiss":
            raise StoreError(f"{manifest_path}: not a FAISS index of format {FORMAT_VERSION} "
                             f"(found store={quote(manifest.get('store'), 40)}, "
                             f"format={quote(manifest.get('format_version'), 40)})")
        require_keys(manifest, {"dim": int, "kind": str, "count": int, "next_iid": int}, manifest_path, StoreError)
        if manifest["kind"] not in KINDS:
            raise StoreError(f"{manifest_path}: unknown index kind {quote(manifest['kind'], 40)}")
        for key, kinds in (("info", (dict, type(None))), ("nlist", (int, type(None))), ("pq_m", int), ("hnsw_m", int)):
            if key in manifest:
                require_keys(manifest, {key: kinds}, manifest_path, StoreError)
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
                    if verify:
                        verify_file(file, files[file.name], manifest_path)
                    else:
                        verify_size(file, files[file.name], manifest_path)
                elif file.exists():
                    raise StoreError(f"{file}: not listed in {manifest_path.name}; rebuild the index")
        store = cls(path, manifest["dim"], manifest["kind"], manifest.get("info"), manifest.get("nlist"),
                    manifest.get("pq_m", 16), manifest.get("hnsw_m", 32))
        store._next_iid = manifest["next_iid"]
        store.owner = owner
        if index_path.exists():
            try:
                store._index = faiss.read_index(str(index_path))  # owns its memory: never re-wrap it
            except RuntimeError as exc:
                raise StoreError(f"{index_path}: corrupt FAISS index ({one_line(str(exc).splitlines()[0])})") from None
        for line, meta in read_jsonl(metadata_path, StoreError):
            if type(meta.get("id")) is not str or type(meta.get("iid")) is not int:  # 100k calls: the cheap test first
                require_keys(meta, {"id": str, "iid": int}, metadata_path, StoreError, line)
            if meta["id"] in store._meta or meta["iid"] in store._by_iid:
                raise StoreError(f"{metadata_path}:{line}: id {quote(meta['id'], 60)} or iid {meta['iid']} "
                                 "appears twice; rebuild the index")
            if not 0 <= meta["iid"] < store._next_iid:
                raise StoreError(f"{metadata_path}:{line}: iid {meta['iid']} outside 0..next_iid "
                                 f"({store._next_iid}) of {manifest_path.name}; rebuild the index")
            store._meta[meta["id"]] = meta
            store._by_iid[meta["iid"]] = meta["id"]
        store._check_counts(manifest, manifest_path)
        return store

    def _check_counts(self, manifest: dict[str, Any], manifest_path: Path) -> None:
        """The manifest, the metadata and the FAISS index describe the same vectors."""
        count, index_path = manifest["count"], self.path / INDEX_FILE
        if len(self._meta) != count:
            raise StoreError(f"{self.path / METADATA_FILE}: {len(self._meta)} rows, but {manifest_path.name} "
                             f"records count {count}; rebuild the index")
        if self._index is None:
            if count:
                raise StoreError(f"{index_path}: file not found, but {manifest_path.name} records {count} vectors")
            return
        if not isinstance(self._index, faiss.IndexIDMap2):
            raise StoreError(f"{index_path}: not an id-mapped FAISS index ({type(self._index).__name__}); "
                             "rebuild the index")
        if self._index.d != self.dim:
            raise StoreError(f"{index_path}: vectors of {self._index.d} dimensions, but {manifest_path.name} "
                             f"records dim {self.dim}; rebuild the index")
        if self._index.ntotal != count:
            raise StoreError(f"{index_path}: {self._index.ntotal} vectors, but {manifest_path.name} records "
                             f"count {count}; rebuild the index")
        stored = faiss.vector_to_array(self._index.id_map)
        if not np.array_equal(np.sort(stored), np.fromiter(sorted(self._by_iid), np.int64, len(self._by_iid))):
            raise StoreError(f"{index_path}: its vector ids differ from those of {METADATA_FILE}; rebuild the index")
