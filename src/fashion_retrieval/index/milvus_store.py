"""Milvus vector store: the same interface as FAISS, for catalogs larger than one machine.

``path`` is either a local directory (embedded milvus-lite: ``DIR/milvus.db`` plus a manifest;
what the tests and a laptop use) or a server URI (``http://host:19530``, ``https://…`` for
Zilliz Cloud) of a Milvus server or cluster, where sharding, replication and durability are the
server's job. The token (``user:password`` or an API key) comes from the caller or the
environment variable ``MILVUS_TOKEN``; it is never written to disk. Metadata travels as a JSON
string field beside each vector.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import atomic
from ..files import quote, read_json, require_keys
from ..names import MILVUS_IDENTIFIER, milvus_identifier
from .filters import ATTRIBUTE_PREFIX, TOP_LEVEL_FIELDS, SearchFilter, field_values
from .store import StoreError, VectorStore, check_add, check_vectors, guard

FORMAT_VERSION = 1
MAX_ID_LENGTH = 512
MAX_METADATA_BYTES = 65_535  # Milvus VARCHAR limit


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


class MilvusStore(VectorStore):
    def __init__(self, path: str | Path, dim: int, info: dict[str, Any] | None = None,
                 collection: str = "fashion_retrieval", token: str | None = None, owner: str | Path | None = None,
                 replace: bool = False):
        from pymilvus import MilvusClient

        self.path = str(path)
        self.dim = dim
        self.info = dict(info or {})
        if not isinstance(collection, str) or not MILVUS_IDENTIFIER.fullmatch(collection):
            # names from data go through names.milvus_identifier before they get here
            raise StoreError(f"{path}: {quote(collection, 80)} is not a Milvus collection name "
                             "(letters, digits and '_', not starting with a digit)")
        self.collection = collection
        if _is_server(self.path):
            self._client = MilvusClient(uri=self.path, token=token or os.environ.get("MILVUS_TOKEN", ""))
        else:
            # the folder this store writes (milvus.db, manifest.json) must stay inside its owner
            self.owner = Path(owner) if owner is not None else Path(self.path).parent
            guard(self.path, self.owner)
            Path(self.path).mkdir(parents=True, exist_ok=True)
            self._client = MilvusClient(str(Path(self.path) / "milvus.db"))
        if replace and self._client.has_collection(collection):
            self._client.drop_collection(collection)  # a new build replaces what an earlier one left
        if not self._client.has_collection(collection):
            # Strong: a search sees every write acknowledged before it (a server's default,
            # Bounded, may answer from a few seconds back); milvus-lite is strong anyway
            self._client.create_collection(collection, dimension=dim, metric_type="IP", auto_id=False,
                                           id_type="string", max_length=MAX_ID_LENGTH, consistency_level="Strong")
        else:
            # a collection persisted by another process starts released: searching it needs a load
            self._client.load_collection(collection)

    def add(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict[str, Any]] | None = None) -> None:
        ids, vectors, metadata = check_add(ids, vectors, metadata, self.dim)
        rows = []
        for item_id, vector, meta in zip(ids, vectors, metadata):
            if len(item_id.encode()) > MAX_ID_LENGTH:
                raise ValueError(f"id longer than {MAX_ID_LENGTH} bytes: {item_id[:40]}…")
            text = json.dumps({**meta, "id": item_id}, ensure_ascii=False)
            if len(text.encode()) > MAX_METADATA_BYTES:
                raise ValueError(f"metadata of {item_id} exceeds {MAX_METADATA_BYTES} bytes")
            rows.append({"id": item_id, "vector": vector.tolist(), "meta": text, **filter_columns(meta)})
        for start in range(0, len(rows), 1000):
            self._client.upsert(self.collection, rows[start:start + 1000])

    def remove(self, ids: Sequence[str]) -> int:
        ids = [str(i) for i in ids]
        present = [row["id"] for row in self._client.get(self.collection, ids=ids, output_fields=["id"])] if ids else []
        if present:
            self._client.delete(self.collection, ids=present)
        return len(present)

    def search(self, vectors: np.ndarray, k: int, where: SearchFilter | None = None) -> tuple[np.ndarray, list[list[str]]]:
        vectors = check_vectors(vectors, self.dim, "query vectors")
        if k < 1:
            raise ValueError("k must be at least 1")
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(vectors), 0), np.float32), [[] for _ in vectors]
        expression = "" if where is None else filter_expression(where)
        hits = self._client.search(self.collection, data=vectors.tolist(), limit=k, filter=expression, output_fields=[])
        ids = [[hit["id"] for hit in row] for row in hits]
        width = min(map(len, ids), default=0)  # a filter can leave fewer than k: one width for the score array
        scores = np.array([[hit["distance"] for hit in row[:width]] for row in hits], dtype=np.float32)
        return scores.reshape(len(hits), width), [row[:width] for row in ids]

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        rows = {row["id"]: row["vector"] for row in
                self._client.get(self.collection, ids=[str(i) for i in ids], output_fields=["vector"])}
        return np.array([rows[str(i)] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)

    def get_metadata(self, item_id: str) -> dict[str, Any] | None:
        rows = self._client.get(self.collection, ids=[str(item_id)], output_fields=["meta"])
        return json.loads(rows[0]["meta"]) if rows else None

    def items(self, batch_size: int = 1000) -> list[dict[str, Any]]:
        """Every item's metadata (a full scan: for the filter fields and their values)."""
        iterator = self._client.query_iterator(self.collection, batch_size=batch_size, filter="", output_fields=["meta"])
        rows: list[dict[str, Any]] = []
        try:
            while batch := iterator.next():
                rows += [json.loads(row["meta"]) for row in batch]
        finally:
            iterator.close()
        return rows

    def __len__(self) -> int:
        result = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def save(self) -> None:
        self._client.flush(self.collection)
        if _is_server(self.path):
            return
        manifest = {"format_version": FORMAT_VERSION, "store": "milvus", "dim": self.dim,
                    "collection": self.collection, "count": len(self), "info": self.info}
        target = Path(self.path) / "manifest.json"
        guard(target, self.owner)
        atomic.write_text(target, json.dumps(manifest, indent=2))

    def close(self) -> None:
        self._client.close()

    @classmethod
    def open(cls, path: str | Path, collection: str = "fashion_retrieval",
             owner: str | Path | None = None, token: str | None = None) -> "MilvusStore":
        if _is_server(str(path)):
            from pymilvus import MilvusClient

            client = MilvusClient(uri=str(path), token=token or os.environ.get("MILVUS_TOKEN", ""))
            try:
                if not client.has_collection(collection):
                    raise StoreError(f"{path}: no collection '{collection}' on this Milvus server; rebuild the index")
                dim = next(f for f in client.describe_collection(collection)["fields"]
                           if f["name"] == "vector")["params"]["dim"]
            finally:
                client.close()
            return cls(path, int(dim), collection=collection, token=token)
        manifest_path = Path(path) / "manifest.json"
        if not manifest_path.is_file():
            raise StoreError(f"{path}: not a Milvus index directory (no manifest.json)")
        manifest = read_json(manifest_path, StoreError)
        if manifest.get("store") != "milvus":
            raise StoreError(f"{manifest_path}: not a Milvus index (store={quote(manifest.get('store'), 40)})")
        require_keys(manifest, {"dim": int}, manifest_path, StoreError)
        return cls(path, manifest["dim"], manifest.get("info"), manifest.get("collection", collection), owner=owner)


# ---- filters: each filter field is a dynamic field holding the item's values as a JSON list ----
def filter_column(key: str) -> str:
    """The dynamic field of a canonical filter key: names from data pass through
    :func:`names.milvus_identifier`, top-level and attribute fields under distinct prefixes."""
    if key.startswith(ATTRIBUTE_PREFIX):
        return milvus_identifier(key[len(ATTRIBUTE_PREFIX):], prefix="a_")
    return milvus_identifier(key, prefix="f_")


def filter_columns(meta: dict[str, Any]) -> dict[str, list[str]]:
    keys = list(TOP_LEVEL_FIELDS) + [ATTRIBUTE_PREFIX + str(a) for a in (meta.get("attributes") or {})]
    columns = {filter_column(key): field_values(meta, key) for key in keys}
    return {column: values for column, values in columns.items() if values}


def string_list(values) -> str:
    """A Milvus list literal of strings. JSON's string escapes (quote, backslash, control
    characters) are the ones Milvus' expression grammar reads, so a value can never end its
    literal and become part of the expression."""
    return "[" + ", ".join(json.dumps(str(v), ensure_ascii=False) for v in sorted(values)) + "]"


def filter_expression(where: SearchFilter) -> str:
    """The Milvus boolean expression that accepts exactly the items ``where.matches`` accepts."""
    terms = [f"json_contains_any({filter_column(key)}, {string_list(values)})" for key, values in where.fields]
    if where.ids is not None:
        ids = string_list(where.ids)
        terms.append(f"(id in {ids} or json_contains_any({filter_column('item_id')}, {ids}))")
    return " and ".join(terms)
