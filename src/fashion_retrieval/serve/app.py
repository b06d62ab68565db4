"""HTTP API and web page over a catalog index.

Only files recorded in the index metadata can be served; nothing in a request is ever used as
a path. Uploads are bounded in bytes while they arrive and in pixels before they are decoded.
Decoding runs in worker threads, at most ``Limits.max_concurrent`` at a time, and the model on
one thread of its own, so the event loop keeps answering (and rejecting) other requests meanwhile.
"""
# no `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations, and
# Query(le=limits.max_k) refers to a local of create_app that a string annotation cannot reach
import asyncio
import hashlib
import hmac
import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data.images import ImageLoadError, load_rgb
from ..files import quote as files_quote
from ..index.catalog import CatalogIndex, UnknownSpaceError
from ..index.store import StoreError
from ..names import name_problem
from .embedders import Embedder

STATIC_DIR = Path(__file__).parent / "static"
ALLOWED_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small form fields around the file
STORED_UPLOAD_SIDE = 1024  # images added over HTTP are kept for display, not at full resolution


class Limits:
    def __init__(self, max_upload_bytes: int = 10 * 2**20, max_k: int = 100, max_pixels: int = 40_000_000,
                 max_concurrent: int = 4):
        self.max_upload_bytes = max_upload_bytes
        self.max_k = max_k
        self.max_pixels = max_pixels
        # each decode holds up to max_pixels·3 bytes: this bounds the server's memory under load
        self.max_concurrent = max_concurrent

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes + MULTIPART_OVERHEAD


class BodyTooLarge(HTTPException):  # an HTTPException, so FastAPI's body parsing passes it through
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """Refuse bodies over the limit: from Content-Length before reading anything, and by counting
    the bytes of chunked bodies as they arrive, so the multipart parser never spools more."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = JSONResponse({"detail": f"request body larger than {self.max_bytes} bytes"}, 413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


def decode_upload(data: bytes, limits: Limits):
    """Bytes of an uploaded photo → RGB image, or an HTTP error with the right status."""
    if not data:
        raise HTTPException(400, "empty upload: send an image file")
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(413, f"upload larger than {limits.max_upload_bytes} bytes")
    with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:  # one decoder for files and uploads
        tmp.write(data)
        tmp.flush()
        try:
            return load_rgb(tmp.name, max_pixels=limits.max_pixels)
        except ImageLoadError as exc:
            if exc.reason.startswith("too large"):
                raise HTTPException(413, f"image {exc.reason}") from None
            if exc.reason.startswith("not an image"):
                raise HTTPException(415, "not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF") from None
            raise HTTPException(400, f"unreadable image: {exc.reason}") from None


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"


def create_app(index_dir: str | Path, embedder: Embedder, api_key: str | None = None,
               limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    catalog = CatalogIndex.open(index_dir)
    if catalog.dim != embedder.feat_dim:
        raise ValueError(f"{index_dir}: index vectors have {catalog.dim} dimensions, the model gives "
                         f"{embedder.feat_dim}: build the index with this model")
    lock = threading.RLock()  # searches and writes see a consistent index
    # at most max_concurrent uploads decoded at once (each may hold max_pixels·3 bytes); a thread
    # semaphore, not an asyncio one: it works whichever event loop (or test client) calls
    slots = threading.BoundedSemaphore(limits.max_concurrent)

    def bounded(function, *args):
        with slots:
            return function(*args)

    uploads_dir = Path(index_dir).resolve().parent / (Path(index_dir).name + "-uploads")

    app = FastAPI(title="fashion-retrieval", version="1",
                  description="Search a fashion catalog by photo, optionally within one attribute.")
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def require_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        if api_key is not None and not (x_api_key and hmac.compare_digest(x_api_key.encode(), api_key.encode())):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    # The model runs on one dedicated thread: requests queue for it holding only their small
    # preprocessed tensor, while decoding (and refusing bad uploads) goes on in the thread pool.
    # One thread also keeps torch's per-thread allocator caches from multiplying under load.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def decode_and_preprocess(data: bytes, keep_photo: bool):
        photo = decode_upload(data, limits)
        return embedder.batch([photo]), (photo if keep_photo else None)

    async def read_upload(image: UploadFile, keep_photo: bool = False):
        data = await image.read(limits.max_upload_bytes + 1)
        return await run_in_threadpool(bounded, decode_and_preprocess, data, keep_photo)

    async def embed(pixels, attribute: str | None):
        try:
            return await asyncio.wrap_future(model_thread.submit(embedder.embed_pixels, pixels, attribute))
        except UnknownSpaceError as exc:
            raise HTTPException(400, str(exc)) from None

    def result_rows(scores, ids) -> list[dict[str, Any]]:
        rows = []
        for score, item_id in zip(scores.tolist(), ids):
            meta = catalog.get_metadata(item_id) or {}
            rows.append({"id": item_id, "score": round(float(score), 6),
                         "image_url": image_url(item_id) if meta.get("path") else None,
                         "metadata": {k: v for k, v in meta.items() if k not in ("path", "id")}})
        return rows

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "items": len(catalog), "spaces": catalog.spaces,
                "model": catalog.model_info.get("name")}

    @app.get("/attributes")
    def attributes() -> dict[str, Any]:
        return {"attribute_conditioned": catalog.attribute_conditioned,
                "attributes": catalog.spaces if catalog.attribute_conditioned else []}

    @app.post("/search")
    async def search(image: Annotated[UploadFile, File(description="the query photo")],
                     k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
                     attribute: Annotated[str | None, Query(max_length=200)] = None) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            catalog.store(attribute)  # refuse an unknown attribute before decoding anything
        except UnknownSpaceError as exc:
            raise HTTPException(400, str(exc)) from None
        pixels, _ = await read_upload(image)
        vector = await embed(pixels, attribute)
        with lock:
            scores, ids = catalog.search(vector, k, attribute)
            rows = result_rows(scores[0], ids[0])
        return {"attribute": attribute, "k": k, "results": rows,
                "took_ms": round(1e3 * (time.perf_counter() - started), 2)}

    # ``:path`` so that ids containing "/" (quoted as %2F in image_url) still reach the lookup;
    # the id is only ever a key into the metadata, never part of a file path
    @app.get("/items/{item_id:path}/image")
    def item_image(item_id: str):
        with lock:
            meta = catalog.get_metadata(item_id)
        path = Path(meta["path"]) if meta and meta.get("path") else None
        if path is None or path.suffix.lower() not in ALLOWED_IMAGE_SUFFIXES or not path.is_file():
            raise HTTPException(404, f"no image for item '{item_id}'")
        return FileResponse(path)

    def store_upload(photo, item_id: str) -> Path:
        uploads_dir.mkdir(parents=True, exist_ok=True)
        stored = uploads_dir / (hashlib.sha256(item_id.encode()).hexdigest()[:32] + ".jpg")
        shown = photo.copy()
        shown.thumbnail((STORED_UPLOAD_SIDE, STORED_UPLOAD_SIDE))
        buffer = io.BytesIO()
        shown.save(buffer, "JPEG", quality=90)
        tmp = stored.with_suffix(".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(stored)
        return stored

    def serve_what_is_on_disk() -> None:
        """After a failed save: a change the client is told failed must not stay searchable, nor
        be saved later with someone else's request; another writer's changes are picked up."""
        nonlocal catalog
        try:
            catalog = CatalogIndex.open(index_dir)
        except (StoreError, OSError):
            pass  # nothing better to serve than what is in memory

    def save_or_conflict() -> None:
        try:
            catalog.save()
        except StoreError as exc:  # another writer (an `index add`) changed the index meanwhile
            serve_what_is_on_disk()
            raise HTTPException(409, str(exc)) from None
        except OSError as exc:  # a full or read-only disk: the index on disk is unchanged
            serve_what_is_on_disk()
            raise HTTPException(503, f"could not save the index: {exc.strerror or exc}") from None

    @app.post("/items", dependencies=[Depends(require_key)], status_code=201)
    async def add_item(image: Annotated[UploadFile, File()],
                       item_id: Annotated[str, Form(min_length=1, max_length=200)],
                       category: Annotated[str | None, Form(max_length=200)] = None) -> dict[str, Any]:
        # the id becomes a URL path segment (image_url): "." and ".." would be resolved away by
        # every client, control characters are nobody's id; the stored file is named by its hash
        problem = name_problem(item_id)
        if problem is not None:
            raise HTTPException(400, f"item_id {files_quote(item_id, 80)} {problem}")
        pixels, photo = await read_upload(image, keep_photo=True)
        vectors = {space: await embed(pixels, space if catalog.attribute_conditioned else None)
                   for space in catalog.spaces}
        try:
            stored = await run_in_threadpool(store_upload, photo, item_id)
        except OSError as exc:  # a full disk, before the index is touched
            raise HTTPException(503, f"could not store the image: {exc.strerror or exc}") from None
        meta = {"item_id": item_id, "path": str(stored), "category": category, "domain": "shop"}

        def write() -> None:
            with lock:
                for space, vector in vectors.items():
                    catalog.add(space, [item_id], vector, [meta])
                save_or_conflict()

        await run_in_threadpool(write)
        return {"id": item_id, "items": len(catalog), "image_url": image_url(item_id)}

    @app.delete("/items/{item_id:path}", dependencies=[Depends(require_key)])
    def remove_item(item_id: str) -> dict[str, Any]:
        with lock:
            meta = catalog.get_metadata(item_id)
            if not catalog.remove([item_id]):
                raise HTTPException(404, f"no item '{item_id}'")
            save_or_conflict()
        stored = Path(meta["path"]) if meta and meta.get("path") else None
        if stored is not None and stored.parent == uploads_dir:
            stored.unlink(missing_ok=True)  # an image this server stored; catalog files are the owner's
        return {"removed": item_id, "items": len(catalog)}

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="page")
    return app
