"""A searchable catalog: one vector store per embedding space, plus the model that made them.

Layout of ``INDEX_DIR``::

    index.json             model identity (origin checkpoint, sha256 of its weights), image size,
                           spaces, store kind, count, catalog_roots (the folders holding the
                           catalog's images: the only ones the server serves pictures from),
                           embedding (how photos are embedded: ``{"flip": true}`` when the
                           catalog holds flip-averaged vectors, so queries are embedded so too)
    model/                 a copy of the checkpoint (model.safetensors + meta.json): queries are
                           embedded by exactly the model that embedded the catalog, even after the
                           training run directory is overwritten or moved
    spaces/<space dir>/    one FaissStore per space: "default" for a plain model, one per
                           attribute for an attribute-conditioned model (ASEN, M3-Net …);
                           ``<space dir>`` is :func:`names.path_component` of the space name
                           (the name itself when plain), recorded in index.json ``space_dirs``

A build writes a new directory and swaps it in atomically. A later save (``index add`` /
``remove``, the server's writes) changes the directory in place and costs what changed: each
space writes a segment and a manifest for the next generation, then ``index.json``, naming that
generation, replaces the old one by a rename. That rename is the one commit of all the spaces:
until it, readers load every space at the previous generation, whose files are only deleted
after it. So a crash at any moment leaves the previous catalog or the new one. Writers and
openers of one index take an exclusive lock on the sibling file ``.INDEX_DIR.lock`` for the few
moments of a commit, a swap or a crash recovery, so an ``open`` never reads half of a commit
nor rolls back a swap that another process is in the middle of.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import atomic
from ..files import quote, read_json, require_keys
from ..names import check_name, is_component, milvus_identifier, path_component
from .faiss_store import FaissStore
from .filters import SearchFilter, facets, known_fields
from .store import (StoreError, VectorStore, file_sha256, fsync_dir, guard, recover, swap_in, verify_file,
                    verify_size, write_file_synced)

FORMAT_VERSION = 2  # spaces in segments (faiss_store format 2); 1: each save rewrote the directory
READABLE_FORMATS = (1, 2)  # format 1 opens as it is and is migrated by its first save
DEFAULT_SPACE = "default"
MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"  # the names engine/checkpoint.py gives a run directory's files
META_FILE = "meta.json"
MANIFEST = "index.json"
SPACES_DIR = {"faiss": "spaces", "milvus": "milvus"}


class UnknownSpaceError(KeyError):
    """An attribute the index (or model) has no space for, or a missing/superfluous attribute."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def checkpoint_files(checkpoint: str | Path) -> tuple[Path, Path]:
    """(weights, meta.json) of a run directory, its weights file, its meta.json, an index or ``zoo:NAME``."""
    from ..engine.checkpoint import resolve_zoo

    checkpoint = resolve_zoo(checkpoint)
    if (checkpoint / "index.json").is_file():
        checkpoint = checkpoint / MODEL_DIR
    if checkpoint.is_dir():
        return checkpoint / WEIGHTS_FILE, checkpoint / META_FILE
    if checkpoint.name == META_FILE:
        return checkpoint.with_name(WEIGHTS_FILE), checkpoint
    return checkpoint, checkpoint.with_name(META_FILE)


@contextlib.contextmanager
def index_lock(path: Path) -> Iterator[None]:
    """Exclusive lock for swapping or recovering ``path``; a no-op where it cannot be taken
    (no fcntl, read-only parent folder): a read-only index is never swapped anyway."""
    try:
        import fcntl
    except ImportError:  # Windows: single-writer use only
        yield
        return
    try:
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links cost nothing and the model files are never modified in place."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        atomic.fsync_file(target)


class CatalogIndex:
    def __init__(self, path: str | Path, model_info: dict[str, Any], spaces: Sequence[str], dim: int,
                 kind: str = "flat", store: str = "faiss", stores: dict[str, VectorStore] | None = None,
                 model_files: dict[str, Path] | None = None, generation: int | None = None,
                 space_dirs: dict[str, str] | None = None, milvus_uri: str | None = None,
                 flip: bool = False):
        self.path = Path(path)
        self.model_info = model_info
        self.spaces = list(spaces)
        self.dim = dim
        self.kind = kind
        self.store_name = store
        # a Milvus server (http://host:19530) instead of milvus-lite files under the index; its
        # token is read from MILVUS_TOKEN when a store connects, never recorded
        self.milvus_uri = milvus_uri
        # space name → its folder under spaces/ (or milvus/): names come from data (a catalog
        # CSV's attribute keys, a checkpoint's meta.json) and are never joined to a path as they are
        self.space_dirs = dict(space_dirs) if space_dirs is not None else space_dirs_for(self.spaces)
        self.stores: dict[str, VectorStore] = stores or {s: self._new_store(s) for s in self.spaces}
        # where save() takes the model copy from: the checkpoint at build time, the index itself later
        self.model_files = model_files or {name: self.path / MODEL_DIR / name for name in (WEIGHTS_FILE, META_FILE)}
        # the saved state this object started from (None: a new build, which replaces whatever is there)
        self.generation = generation
        # folders (resolved) that hold every recorded image; None for an index older than this field
        self.catalog_roots: list[str] | None = None
        # size and sha256 of each model file, as index.json records them (known once verified or written)
        self.model_records: dict[str, dict[str, Any]] | None = None
        self._facets: dict[str, Any] | None = None  # filter fields and values, until the next change
        # the catalog's vectors are flip-averaged (index build --flip): queries and later adds
        # must be embedded the same way, or they are compared with vectors of another kind
        self.flip = bool(flip)

    def space_path(self, space: str, root: Path | None = None) -> Path:
        """Where ``space``'s store lives under ``root`` (default: the index), checked to be inside."""
        owner = (self.path if root is None else root) / SPACES_DIR.get(self.store_name, "spaces")
        path = owner / self.space_dirs[space]
        guard(path, owner, f"store of space {quote(space, 80)}")
        return path

    def collection(self, space: str) -> str:
        return milvus_collection(self.path, space, self.milvus_uri)

    def _new_store(self, space: str) -> VectorStore:
        if self.store_name == "milvus":
            from .milvus_store import MilvusStore

            if self.milvus_uri is not None:
                return MilvusStore(self.milvus_uri, self.dim, collection=self.collection(space), replace=True)
            return MilvusStore(self.space_path(space), self.dim, collection=milvus_identifier(space),
                               owner=self.path / SPACES_DIR["milvus"])
        store = FaissStore(self.space_path(space), self.dim, self.kind)
        store.owner = self.path / SPACES_DIR["faiss"]
        return store

    @property
    def model_dir(self) -> Path:
        """The index's own copy of its checkpoint: what search, serve and `index add` load."""
        return self.path / MODEL_DIR

    @property
    def attribute_conditioned(self) -> bool:
        return self.spaces != [DEFAULT_SPACE]

    def store(self, space: str | None) -> VectorStore:
        if space is None:
            if self.attribute_conditioned:
                raise UnknownSpaceError(f"this index is per attribute: choose one of {', '.join(self.spaces)}")
            space = DEFAULT_SPACE
        elif not self.attribute_conditioned:
            raise UnknownSpaceError(f"this index has no attribute spaces (asked for '{space}')")
        if space not in self.stores:
            raise UnknownSpaceError(f"unknown attribute '{space}'; this index has {', '.join(self.spaces)}")
        return self.stores[space]

    def add(self, space: str, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict] | None = None) -> None:
        self.stores[space].add(ids, vectors, metadata)
        self._facets = None

    def remove(self, ids: Sequence[str]) -> int:
        self._facets = None
        return max((store.remove(ids) for store in self.stores.values()), default=0)

    def search(self, vectors: np.ndarray, k: int, space: str | None = None, where: SearchFilter | None = None,
               query_expansion=None):
        """Top-k of ``space`` among the items ``where`` accepts (a field the catalog's metadata
        never holds is refused with :class:`FilterError`, naming it). ``query_expansion`` (a
        ``rerank.QueryExpansion``): search again with each query expanded by its k nearest
        accepted items (α-QE); the scores are then those of the expanded queries."""
        store = self.store(space)
        if where is not None:
            where.check_fields(self.filter_fields())
        if query_expansion is not None and query_expansion.k > 0:
            vectors = self._expanded(store, vectors, where, query_expansion)
        if where is None:
            return store.search(vectors, k)
        return store.search(vectors, k, where=where)

    @staticmethod
    def _expanded(store: VectorStore, vectors: np.ndarray, where: SearchFilter | None, expansion) -> np.ndarray:
        from ..rerank import expand_queries

        scores, ids = store.search(vectors, expansion.k) if where is None else store.search(vectors, expansion.k, where)
        width = max((len(row) for row in ids), default=0)
        found = np.zeros((len(vectors), width), dtype=bool)
        neighbours = np.zeros((len(vectors), width, store.dim), dtype=np.float32)
        similarities = np.zeros((len(vectors), width), dtype=np.float32)
        for row, row_ids in enumerate(ids):
            found[row, :len(row_ids)] = True
            if row_ids:
                neighbours[row, :len(row_ids)] = store.vectors_of(row_ids)
            similarities[row, :len(row_ids)] = scores[row, :len(row_ids)]
        return expand_queries(np.asarray(vectors, dtype=np.float32), neighbours, similarities, expansion.alpha, found)

    def facets(self) -> dict[str, dict[str, int]]:
        """Items per value of each filter field (category, domain, every attribute), from the
        metadata; computed once per state of the catalog."""
        if self._facets is None:
            store = next(iter(self.stores.values()), None)
            metadata = store.items() if store is not None and hasattr(store, "items") else []
            self._facets = {"fields": known_fields(metadata),
                            "values": {name: dict(sorted(counts.items())) for name, counts in facets(metadata).items()}}
        return self._facets["values"]

    def filter_fields(self) -> list[str]:
        """The field names a search filter may use on this catalog."""
        self.facets()
        return self._facets["fields"]

    def get_metadata(self, item_id: str) -> dict[str, Any] | None:
        return next(iter(self.stores.values())).get_metadata(item_id) if self.stores else None

    def __len__(self) -> int:
        return len(next(iter(self.stores.values()))) if self.stores else 0

    def _manifest(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION if self.store_name == "faiss" else 1, "model": self.model_info, "spaces": self.spaces,
                "dim": self.dim, "kind": self.kind, "store": self.store_name, "count": len(self),
                "generation": self.generation, "files": self._model_records(), "space_dirs": self.space_dirs,
                "embedding": {"flip": self.flip},
                **({"milvus_uri": self.milvus_uri} if self.milvus_uri is not None else {}),
                **({"catalog_roots": self.catalog_roots} if self.catalog_roots is not None else {})}

    def _model_records(self) -> dict[str, dict[str, Any]]:
        if self.model_records is None:
            self.model_records = {f"{MODEL_DIR}/{name}": {"size": source.stat().st_size, "sha256": file_sha256(source)}
                                  for name, source in self.model_files.items()}
        return self.model_records

    def _next_generation(self) -> int:
        """Optimistic concurrency: refuse to overwrite a save made since this object was opened."""
        on_disk = _read_generation(self.path)
        if self.generation is not None and on_disk != self.generation:
            raise StoreError(f"{self.path}: changed on disk by another writer since it was opened "
                             f"(generation {self.generation} -> {on_disk}); reopen it and retry")
        return (on_disk or 0) + 1

    def _write_model(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, source in self.model_files.items():
            if source.resolve() != (directory / name).resolve():
                _link_or_copy(source, directory / name)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.store_name == "milvus":
            self._save_milvus()
            return
        with index_lock(self.path):
            recover(self.path, marker=MANIFEST)
            refuse_foreign_directory(self.path)
            if self.generation is not None and all(getattr(s, "generation", None) is not None
                                                   for s in self.stores.values()):
                self._save_in_place()
            else:
                self._save_whole()
        self.model_files = {name: self.model_dir / name for name in self.model_files}

    def _save_in_place(self) -> None:
        """Each space writes its changes as the next generation; the new index.json commits them all."""
        generation = self._next_generation()
        stores: dict[str, FaissStore] = self.stores  # type: ignore[assignment]
        for store in stores.values():
            store.collect_garbage()  # what a save that crashed before its commit left
        manifests = {space: store.write_generation(generation) for space, store in stores.items()}
        previous, self.generation = self.generation, generation
        try:
            tmp = self.path / (MANIFEST + ".tmp")
            guard(tmp, self.path, "index manifest")
            write_file_synced(tmp, json.dumps(self._manifest(), indent=2).encode("utf-8"))
            os.replace(tmp, self.path / MANIFEST)  # the commit
            fsync_dir(self.path)
        except BaseException:
            self.generation = previous
            raise
        for space, store in stores.items():
            store.adopt(manifests[space])
            store.collect_garbage()

    def _save_whole(self) -> None:
        """A new build: the complete directory is written beside the old one and swapped in."""
        previous, self.generation = self.generation, self._next_generation()
        tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".tmp-", dir=self.path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the index from a server run as another user
        manifests = {}
        try:
            self._write_model(tmp / MODEL_DIR)
            for space, store in self.stores.items():
                directory = self.space_path(space, tmp)
                directory.mkdir(parents=True)
                manifests[space] = store.write_generation(self.generation, directory)
            # index.json is written last: a directory without one is never a complete index
            write_file_synced(tmp / MANIFEST, json.dumps(self._manifest(), indent=2).encode("utf-8"))
            swap_in(tmp, self.path, marker=MANIFEST)
        except BaseException:
            self.generation = previous
            shutil.rmtree(tmp, ignore_errors=True)
            recover(self.path, marker=MANIFEST)
            raise
        for space, store in self.stores.items():
            store.adopt(manifests[space])

    def _save_milvus(self) -> None:
        """Milvus persists vectors by itself; the model copy and the manifest are ours."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.model_dir.exists():  # the model never changes after the build
            staging = Path(tempfile.mkdtemp(prefix=".model-", dir=self.path))
            os.chmod(staging, 0o755)
            try:
                self._write_model(staging)
                guard(self.model_dir, self.path, "model copy")
                staging.rename(self.model_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self.generation = self._next_generation()
        for store in self.stores.values():
            store.save()
        atomic.write_bytes(self.path / "index.json", json.dumps(self._manifest(), indent=2).encode("utf-8"))
        self.model_files = {name: self.model_dir / name for name in self.model_files}

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "CatalogIndex":
        """Load ``path``; every file is checked against the size and sha256 recorded when it was
        written (``verify=False``: sizes and counts only), so a damaged index fails here, naming
        the file, and is never the starting point of a save."""
        path = Path(path)
        if not path.exists() and not path.with_name(path.name + ".old").exists():
            raise StoreError(f"{path}: no such index directory")
        with index_lock(path):
            recover(path, marker=MANIFEST)
            return cls._read(path, verify)

    @classmethod
    def _read(cls, path: Path, verify: bool = True) -> "CatalogIndex":
        manifest_path = path / "index.json"
        if not manifest_path.is_file():
            raise StoreError(f"{path}: not an index built by fashion-retrieval (no index.json)")
        manifest = read_json(manifest_path, StoreError)
        if manifest.get("format_version") not in READABLE_FORMATS:
            raise StoreError(f"{manifest_path}: index format {quote(manifest.get('format_version'), 40)}, "
                             f"this version reads {' and '.join(map(str, READABLE_FORMATS))}; rebuild the index")
        require_keys(manifest, {"model": dict, "spaces": list, "dim": int}, manifest_path, StoreError)
        if not manifest["spaces"] or not all(isinstance(space, str) and space for space in manifest["spaces"]):
            raise StoreError(f"{manifest_path}: 'spaces' must be a list of names, got {quote(manifest['spaces'], 60)}")
        if manifest.get("generation") is not None:
            require_keys(manifest, {"generation": int}, manifest_path, StoreError)
        if manifest.get("store", "faiss") not in ("faiss", "milvus"):
            raise StoreError(f"{manifest_path}: unknown store {quote(manifest.get('store'), 40)}")
        model_records = _verify_model(path, manifest, manifest_path, verify)
        store_name = manifest.get("store", "faiss")
        space_dirs = _recorded_space_dirs(manifest, manifest_path)
        stores: dict[str, VectorStore] = {}
        owner = path / SPACES_DIR.get(store_name, "spaces")
        milvus_uri = manifest.get("milvus_uri")
        if milvus_uri is not None and (not isinstance(milvus_uri, str) or not milvus_uri.startswith(("http://", "https://"))):
            raise StoreError(f"{manifest_path}: 'milvus_uri' must be an http(s) URI, got {quote(milvus_uri, 80)}")
        for space, directory in space_dirs.items():
            space_dir = owner / directory
            guard(space_dir, owner, f"store of space {quote(space, 80)}")
            if store_name == "milvus":
                from .milvus_store import MilvusStore

                if milvus_uri is not None:
                    stores[space] = MilvusStore.open(milvus_uri, collection=milvus_collection(path, space, milvus_uri))
                else:
                    stores[space] = MilvusStore.open(space_dir, collection=milvus_identifier(space), owner=owner)
            else:
                # the generation index.json names: a space's later manifest is an uncommitted save
                stores[space] = FaissStore.open(space_dir, verify, owner=owner,
                                                generation=int(manifest.get("generation") or 0))
                if stores[space].dim != manifest["dim"]:
                    raise StoreError(f"{space_dir / 'manifest.json'}: dim {stores[space].dim}, but "
                                     f"{manifest_path} records dim {manifest['dim']}; rebuild the index")
        catalog = cls(path, manifest["model"], list(space_dirs), manifest["dim"], manifest.get("kind", "flat"),
                      store_name, stores, generation=int(manifest.get("generation") or 0), space_dirs=space_dirs,
                      milvus_uri=milvus_uri, flip=_recorded_flip(manifest, manifest_path))
        roots = manifest.get("catalog_roots")
        if roots is not None:
            if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
                raise StoreError(f"{manifest_path}: 'catalog_roots' must be a list of folder names")
            catalog.catalog_roots = roots
        catalog.model_records = model_records
        counts = {space: len(store) for space, store in stores.items()}
        if manifest.get("store", "faiss") == "faiss" and len(set(counts.values())) > 1:
            raise StoreError(f"{path}: the spaces hold different numbers of items ({counts}); rebuild the index")
        return catalog


def milvus_collection(index: Path, space: str, milvus_uri: str | None) -> str:
    """A space's Milvus collection. On a server, which several indexes may share, the index's
    folder name is part of it (``fr_<index>_space_<space>``)."""
    if milvus_uri is None:
        return milvus_identifier(space)
    return milvus_identifier(space, prefix=milvus_identifier(Path(index).resolve().name, prefix="fr_") + "_space_")


def _verify_model(path: Path, manifest: dict[str, Any], manifest_path: Path,
                  verify: bool) -> dict[str, dict[str, Any]] | None:
    """The model copy is the one the index was built with: each file's recorded size and sha256
    (indexes written before ``files`` was recorded: the weights' sha256 in ``model``)."""
    files = {name: path / MODEL_DIR / name for name in (WEIGHTS_FILE, META_FILE)}
    for name, file in files.items():
        if not file.is_file():
            raise StoreError(f"{path}: the index's model copy is missing {MODEL_DIR}/{name}; rebuild the index")
    records = manifest.get("files")
    if records is None:
        expected = manifest["model"].get("sha256")
        if verify and isinstance(expected, str) and file_sha256(files[WEIGHTS_FILE]) != expected:
            raise StoreError(f"{files[WEIGHTS_FILE]}: sha256 differs from the model's in {manifest_path.name} "
                             "(corrupt file); rebuild the index")
        return None
    if not isinstance(records, dict):
        raise StoreError(f"{manifest_path}: 'files' must be an object, got {quote(records, 60)}")
    for name, file in files.items():
        key = f"{MODEL_DIR}/{name}"
        if key not in records:
            raise StoreError(f"{manifest_path}: 'files' does not list {key}; rebuild the index")
        (verify_file if verify else verify_size)(file, records[key], manifest_path)
    return {f"{MODEL_DIR}/{name}": records[f"{MODEL_DIR}/{name}"] for name in files}


def space_dirs_for(spaces: Sequence[str], where: str = "index", what: str = "space name") -> dict[str, str]:
    """Folder name of each space of a new index; a name no folder may come from is refused."""
    dirs: dict[str, str] = {}
    for space in spaces:
        check_name(space, what, where, error=StoreError)
        dirs[space] = path_component(space)
    if len(set(dirs.values())) != len(dirs):  # only two crafted names could do this
        raise StoreError(f"{where}: two space names map to one folder; rename one of them")
    return dirs


def _recorded_space_dirs(manifest: dict[str, Any], manifest_path: Path) -> dict[str, str]:
    """name → folder from index.json. An index written before ``space_dirs`` existed used the
    names verbatim: they still open when a name is one harmless folder name (plain names always)."""
    spaces = manifest.get("spaces")
    if not isinstance(spaces, list) or not spaces or not all(isinstance(s, str) for s in spaces):
        raise StoreError(f"{manifest_path}: 'spaces' must be a non-empty list of names")
    for space in spaces:
        check_name(space, "space name", str(manifest_path), error=StoreError)
    recorded = manifest.get("space_dirs")
    if recorded is None:
        recorded = {space: space for space in spaces}
    if not isinstance(recorded, dict) or list(recorded) != spaces:
        raise StoreError(f"{manifest_path}: 'space_dirs' must map each of the 'spaces' to its folder")
    for space, directory in recorded.items():
        if not is_component(directory):
            raise StoreError(f"{manifest_path}: space {quote(space, 80)} has the folder {quote(directory, 80)}, "
                             "which is not a plain folder name; rebuild the index")
    if len(set(recorded.values())) != len(recorded):
        raise StoreError(f"{manifest_path}: two spaces share one folder; rebuild the index")
    return dict(recorded)


def recorded_flip(index_dir: str | Path) -> bool:
    """Whether the index at ``index_dir`` holds flip-averaged vectors (reads index.json only)."""
    manifest_path = Path(index_dir) / MANIFEST
    return _recorded_flip(read_json(manifest_path, StoreError), manifest_path)


def _recorded_flip(manifest: dict[str, Any], manifest_path: Path) -> bool:
    """``embedding.flip`` of index.json; indexes written before it was recorded hold plain vectors."""
    embedding = manifest.get("embedding", {})
    if not isinstance(embedding, dict) or not isinstance(embedding.get("flip", False), bool):
        raise StoreError(f"{manifest_path}: 'embedding' must be an object like {{\"flip\": false}}, "
                         f"got {quote(embedding, 60)}")
    return embedding.get("flip", False)


def _read_generation(path: Path) -> int | None:
    try:
        return int(json.loads((path / "index.json").read_text("utf-8")).get("generation") or 0)
    except (OSError, ValueError, AttributeError):
        return None


def refuse_foreign_directory(path: Path) -> None:
    """Never swap away a folder that is not an index: ``--out ~/photos`` must not delete photos."""
    if path.is_dir() and not (path / "index.json").is_file() and any(path.iterdir()):
        raise StoreError(f"{path}: exists and is not an index; choose a new or empty folder")
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: exists and is not a folder")
