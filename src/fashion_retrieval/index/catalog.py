"""A searchable catalog: one vector store per embedding space, plus the model that made them.

Layout of ``INDEX_DIR``::

    index.json             model identity (checkpoint, sha256 of its weights), image size,
                           spaces, store kind
    spaces/<space>/        one FaissStore per space: "default" for a plain model, one per
                           attribute for an attribute-conditioned model (ASEN, M3-Net …)

The whole directory is replaced atomically on save, so a crash during a build or an incremental
add leaves the previous catalog loadable and answering.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .faiss_store import FaissStore
from .store import StoreError, VectorStore, recover, swap_in, write_file_synced

FORMAT_VERSION = 1
DEFAULT_SPACE = "default"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CatalogIndex:
    def __init__(self, path: str | Path, model_info: dict[str, Any], spaces: Sequence[str], dim: int,
                 kind: str = "flat", store: str = "faiss", stores: dict[str, VectorStore] | None = None):
        self.path = Path(path)
        self.model_info = model_info
        self.spaces = list(spaces)
        self.dim = dim
        self.kind = kind
        self.store_name = store
        self.stores: dict[str, VectorStore] = stores or {s: self._new_store(s) for s in self.spaces}

    def _new_store(self, space: str) -> VectorStore:
        if self.store_name == "milvus":
            from .milvus_store import MilvusStore

            return MilvusStore(self.path / "milvus" / space, self.dim, collection=f"space_{space}")
        return FaissStore(self.path / "spaces" / space, self.dim, self.kind)

    @property
    def attribute_conditioned(self) -> bool:
        return self.spaces != [DEFAULT_SPACE]

    def store(self, space: str | None) -> VectorStore:
        if space is None:
            if self.attribute_conditioned:
                raise KeyError(f"this index is per attribute: choose one of {', '.join(self.spaces)}")
            space = DEFAULT_SPACE
        elif not self.attribute_conditioned:
            raise KeyError(f"this index has no attribute spaces (asked for '{space}')")
        if space not in self.stores:
            raise KeyError(f"unknown attribute '{space}'; this index has {', '.join(self.spaces)}")
        return self.stores[space]

    def add(self, space: str, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict] | None = None) -> None:
        self.stores[space].add(ids, vectors, metadata)

    def remove(self, ids: Sequence[str]) -> int:
        return max((store.remove(ids) for store in self.stores.values()), default=0)

    def search(self, vectors: np.ndarray, k: int, space: str | None = None):
        return self.store(space).search(vectors, k)

    def get_metadata(self, item_id: str) -> dict[str, Any] | None:
        return next(iter(self.stores.values())).get_metadata(item_id) if self.stores else None

    def __len__(self) -> int:
        return len(next(iter(self.stores.values()))) if self.stores else 0

    def save(self) -> None:
        manifest = {"format_version": FORMAT_VERSION, "model": self.model_info, "spaces": self.spaces,
                    "dim": self.dim, "kind": self.kind, "store": self.store_name, "count": len(self)}
        if self.store_name == "milvus":  # Milvus persists by itself; only the manifest is ours
            self.path.mkdir(parents=True, exist_ok=True)
            for store in self.stores.values():
                store.save()
            tmp = self.path / "index.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=2), "utf-8")
            tmp.replace(self.path / "index.json")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recover(self.path)
        tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".tmp-", dir=self.path.parent))
        try:
            for space, store in self.stores.items():
                store.path = tmp / "spaces" / space
                store.save()
            write_file_synced(tmp / "index.json", json.dumps(manifest, indent=2).encode("utf-8"))
            swap_in(tmp, self.path)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            recover(self.path)
            raise
        finally:
            for space, store in self.stores.items():
                store.path = self.path / "spaces" / space

    @classmethod
    def open(cls, path: str | Path) -> "CatalogIndex":
        path = Path(path)
        if not path.exists() and not path.with_name(path.name + ".old").exists():
            raise StoreError(f"{path}: no such index directory")
        recover(path)
        manifest_path = path / "index.json"
        if not manifest_path.is_file():
            raise StoreError(f"{path}: not an index built by fashion-retrieval (no index.json)")
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{manifest_path}: unreadable ({exc})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{manifest_path}: index format {manifest.get('format_version')!r}, "
                             f"this version reads {FORMAT_VERSION}; rebuild the index")
        stores: dict[str, VectorStore] = {}
        for space in manifest["spaces"]:
            if manifest.get("store") == "milvus":
                from .milvus_store import MilvusStore

                stores[space] = MilvusStore.open(path / "milvus" / space, collection=f"space_{space}")
            else:
                stores[space] = FaissStore.open(path / "spaces" / space)
        return cls(path, manifest["model"], manifest["spaces"], manifest["dim"], manifest.get("kind", "flat"),
                   manifest.get("store", "faiss"), stores)
