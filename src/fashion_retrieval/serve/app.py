"""HTTP API and web page over a catalog index.

Only files recorded in the index metadata can be served; nothing in a request is ever used as
a path. Uploads are bounded in bytes before they are read and in pixels before they are decoded.
"""
from __future__ import annotations

import hashlib
import hmac
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import ImageLoadError, load_rgb
from ..index.catalog import CatalogIndex
from .embedders import Embedder

STATIC_DIR = Path(__file__).parent / "static"
ALLOWED_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class Limits:
    def __init__(self, max_upload_bytes: int = 10 * 2**20, max_k: int = 100, max_pixels: int = 40_000_000):
        self.max_upload_bytes = max_upload_bytes
        self.max_k = max_k
        self.max_pixels = max_pixels


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


def create_app(index_dir: str | Path, embedder: Embedder, api_key: str | None = None,
               limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    catalog = CatalogIndex.open(index_dir)
    if catalog.dim != embedder.feat_dim:
        raise ValueError(f"{index_dir}: index vectors have {catalog.dim} dimensions, the model gives "
                         f"{embedder.feat_dim}: build the index with this model")
    lock = threading.RLock()  # searches and writes see a consistent index
    uploads_dir = Path(index_dir).resolve().parent / (Path(index_dir).name + "-uploads")

    app = FastAPI(title="fashion-retrieval", version="1",
                  description="Search a fashion catalog by photo, optionally within one attribute.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.middleware("http")
    async def refuse_oversized_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_upload_bytes + 64 * 1024):
            return JSONResponse({"detail": f"request body larger than {limits.max_upload_bytes} bytes"},
                                status_code=413)
        return await call_next(request)

    def require_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        if api_key is not None and not (x_api_key and hmac.compare_digest(x_api_key, api_key)):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    async def read_upload(image: UploadFile):
        data = await image.read(limits.max_upload_bytes + 1)
        return decode_upload(data, limits)

    def result_rows(scores, ids) -> list[dict[str, Any]]:
        rows = []
        for score, item_id in zip(scores.tolist(), ids):
            meta = catalog.get_metadata(item_id) or {}
            rows.append({"id": item_id, "score": round(float(score), 6),
                         "image_url": f"/items/{item_id}/image" if meta.get("path") else None,
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
        photo = await read_upload(image)
        try:
            vector = embedder.embed([photo], attribute)
            with lock:
                scores, ids = catalog.search(vector, k, attribute)
        except KeyError as exc:
            raise HTTPException(400, exc.args[0]) from None
        return {"attribute": attribute, "k": k, "results": result_rows(scores[0], ids[0]),
                "took_ms": round(1e3 * (time.perf_counter() - started), 2)}

    @app.get("/items/{item_id}/image")
    def item_image(item_id: str):
        meta = catalog.get_metadata(item_id)
        path = Path(meta["path"]) if meta and meta.get("path") else None
        if path is None or path.suffix.lower() not in ALLOWED_IMAGE_SUFFIXES or not path.is_file():
            raise HTTPException(404, f"no image for item '{item_id}'")
        return FileResponse(path)

    @app.post("/items", dependencies=[Depends(require_key)], status_code=201)
    async def add_item(image: Annotated[UploadFile, File()], item_id: Annotated[str, Form(min_length=1, max_length=200)],
                       category: Annotated[str | None, Form()] = None) -> dict[str, Any]:
        photo = await read_upload(image)
        uploads_dir.mkdir(parents=True, exist_ok=True)
        stored = uploads_dir / (hashlib.sha256(item_id.encode()).hexdigest()[:32] + ".png")
        photo.save(stored)
        meta = {"item_id": item_id, "path": str(stored), "category": category}
        with lock:
            for space in catalog.spaces:
                attribute = space if catalog.attribute_conditioned else None
                catalog.add(space, [item_id], embedder.embed([photo], attribute), [meta])
            catalog.save()
        return {"id": item_id, "items": len(catalog)}

    @app.delete("/items/{item_id}", dependencies=[Depends(require_key)])
    def remove_item(item_id: str) -> dict[str, Any]:
        with lock:
            removed = catalog.remove([item_id])
            if not removed:
                raise HTTPException(404, f"no item '{item_id}'")
            catalog.save()
        return {"removed": item_id, "items": len(catalog)}

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="page")
    return app
