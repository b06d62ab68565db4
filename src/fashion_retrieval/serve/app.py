"""HTTP API and web page over a catalog index.

Only files recorded in the index metadata can be served, and only regular image files inside the
folders the index recorded (its catalog roots, or its own uploads folder), opened without
following links; nothing in a request is ever used as a path. Requests must name this server in
their Host header (DNS rebinding) and state-changing ones must not come from another web page
(Origin); writes are off unless an API key is set or they are explicitly opened. Uploads are
bounded in bytes while they arrive and in decoded bytes (by mode, see ``decode_bytes``) before
they are decoded. Decoding runs in worker threads, at most ``Limits.max_concurrent`` at a time and
within a shared byte budget, and the model on one thread of its own, so the event loop keeps
answering (and rejecting) other requests meanwhile.
"""
# no `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations, and
# Query(le=limits.max_k) refers to a local of create_app that a string annotation cannot reach
import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Iterator, Sequence
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import atomic
from ..data.images import ImageLoadError, decode_bytes, load_rgb, open_image
from ..data.readers.catalog import IMAGE_SUFFIXES
from ..files import quote as files_quote
from ..index.catalog import CatalogIndex, UnknownSpaceError
from ..index.filters import FilterError, SearchFilter
from ..index.store import StoreError
from ..names import name_problem
from ..index.embedders import Embedder

_log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
SERVED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}  # what PIL must recognise before we serve it
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small form fields around the file
STORED_UPLOAD_SIDE = 1024  # images added over HTTP are kept for display, not at full resolution
# the model's preprocessing of a decoded photo (to_image's uint8 copy, then the resize's own),
# measured at 6 bytes a pixel on top of the RGB photo itself
PREPROCESS_BYTES_PER_PIXEL = 6
RGB_BYTES_PER_PIXEL = 4  # PIL's RGB layout
# who may reach the server by name (Host header) when nothing else is configured
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# every other query parameter of /search is a filter field
SEARCH_PARAMETERS = ("k", "attribute", "ids", "query_expansion")
MAX_FACET_VALUES = 200  # a field with more distinct values (item ids, free text) gets no value list


class Limits:
    def __init__(self, max_upload_bytes: int = 10 * 2**20, max_k: int = 100, max_pixels: int = 40_000_000,
                 max_concurrent: int = 4, max_decode_bytes: int = 512 * 2**20):
        self.max_upload_bytes = max_upload_bytes
        self.max_k = max_k
        self.max_pixels = max_pixels
        self.max_concurrent = max_concurrent
        # memory all decodes in flight may hold together (each reserves its estimate first); an
        # upload whose decode alone needs more is refused: this bounds the server under load
        self.max_decode_bytes = max_decode_bytes

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


class MemoryBudget:
    """A semaphore counted in bytes: a decode waits until its estimate fits beside the others'.

    Threading-based, like the count semaphore, so it works whichever event loop or test client
    calls; waiting happens in worker threads, never on the event loop.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes exceed the whole budget of {self.capacity}")
        with self._changed:
            self._changed.wait_for(lambda: self.used + amount <= self.capacity)
            self.used += amount
        try:
            yield
        finally:
            with self._changed:
                self.used -= amount
                self._changed.notify_all()


def _load_error(exc: ImageLoadError) -> HTTPException:
    if exc.reason.startswith("too large"):
        return HTTPException(413, f"image {exc.reason}")
    if exc.reason.startswith("not an image"):
        return HTTPException(415, "not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF")
    return HTTPException(400, f"unreadable image: {exc.reason}")


def upload_cost(path: str | Path, limits: Limits) -> int:
    """Bytes a decode of this upload and the model's preprocessing of it hold at their peak,
    from the file's header (the size and mode PIL reads before decoding anything)."""
    try:
        with open(path, "rb") as file, open_image(file) as image:
            width, height = image.size
            pixels = width * height
            if pixels > limits.max_pixels:
                raise HTTPException(413, f"image too large: {width}x{height} pixels exceeds the limit of "
                                         f"{limits.max_pixels}")
            cost = max(decode_bytes(image), pixels * (RGB_BYTES_PER_PIXEL + PREPROCESS_BYTES_PER_PIXEL))
            if cost > limits.max_decode_bytes:
                raise HTTPException(413, f"image too large: decoding {width}x{height} {image.mode} pixels needs "
                                         f"{cost / 2**20:.0f} MiB, over the limit of "
                                         f"{limits.max_decode_bytes / 2**20:.0f} MiB")
            return cost
    except UnidentifiedImageError:
        raise HTTPException(415, "not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF") from None
    except Image.DecompressionBombError:
        raise HTTPException(413, "image too large: PIL refuses it as a decompression bomb") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HTTPException(400, f"unreadable image: truncated or corrupt ({reason})") from None


def decode_upload(data: bytes, limits: Limits, budget: MemoryBudget | None = None, then=None):
    """Bytes of an uploaded photo → RGB image (or ``then(image)``, computed while the decode's
    memory is still reserved), or an HTTP error with the right status."""
    if not data:
        raise HTTPException(400, "empty upload: send an image file")
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(413, f"upload larger than {limits.max_upload_bytes} bytes")
    budget = budget or MemoryBudget(limits.max_decode_bytes)
    with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:  # one decoder for files and uploads
        tmp.write(data)
        tmp.flush()
        with budget.reserve(upload_cost(tmp.name, limits)):
            try:
                photo = load_rgb(tmp.name, max_pixels=limits.max_pixels, max_bytes=limits.max_decode_bytes)
            except ImageLoadError as exc:
                raise _load_error(exc) from None
            if then is None:
                return photo
            result = then(photo)
            del photo  # freed before its reservation ends
            return result


def shown_copy(photo) -> bytes:
    """The JPEG kept for display of an uploaded photo: at most STORED_UPLOAD_SIDE a side, made
    without a full-size copy of the photo (thumbnail() works in place)."""
    shown = photo if max(photo.size) <= STORED_UPLOAD_SIDE else ImageOps.contain(
        photo, (STORED_UPLOAD_SIDE, STORED_UPLOAD_SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    shown.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def open_image_file(recorded: str, roots: Sequence[str]) -> tuple[BinaryIO, str, int] | None:
    """(open file, media type, size) of a recorded catalog photo, or None unless it is a regular
    image file inside ``roots`` (resolved folders).

    The path is resolved first and must lie inside a root; the resolved path is then opened
    without following a link in its last component, and the opened file itself checked: a link
    swapped in between, a folder on the way replaced by a link (the descriptor's own path, from
    /proc, must be the resolved one), a FIFO or device (fstat), or a file PIL does not recognise
    as an image (a password file) is refused. What is sent is read from that descriptor.
    """
    if Path(recorded).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    real = os.path.realpath(recorded)
    if not _inside(real, roots):
        return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError:  # ELOOP: the last component became a link; gone; unreadable
        return None
    try:
        info = os.fstat(fd)
        proc = Path(f"/proc/self/fd/{fd}")
        opened = os.readlink(proc) if proc.parent.is_dir() else real
        if not stat.S_ISREG(info.st_mode) or opened != real:
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    file = os.fdopen(fd, "rb")
    try:
        with open_image(file, tuple(SERVED_FORMATS)) as image:  # the header only; the file stays ours
            kind = image.format
        if kind not in SERVED_FORMATS:
            file.close()
            return None
        file.seek(0)
        return file, Image.MIME.get(kind, "application/octet-stream"), info.st_size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        file.close()
        return None


def _chunks(file: BinaryIO, size: int = 1 << 16) -> Iterator[bytes]:
    with file:
        while block := file.read(size):
            yield block


def catalog_roots(catalog: CatalogIndex, uploads_dir: Path) -> list[str]:
    """The resolved folders the server serves catalog photos from, plus its own uploads folder.

    An index built before catalog roots were recorded gets the deepest folder holding all its
    recorded photos (those outside the uploads folder); when that is the filesystem root (photos
    on several disks, say) no catalog photo is served until the index is rebuilt.
    """
    uploads = os.path.realpath(uploads_dir)
    roots = [uploads]
    if catalog.catalog_roots is not None:
        return roots + [os.path.realpath(root) for root in catalog.catalog_roots]
    store = next(iter(catalog.stores.values()), None)
    items = getattr(store, "items", None)  # Milvus stores cannot list theirs: nothing to fall back on
    folders = {os.path.dirname(os.path.realpath(meta["path"])) for meta in (items() if items else [])
               if meta and isinstance(meta.get("path"), str) and os.path.isabs(meta["path"])}
    folders = {f for f in folders if not _inside(f, [uploads])}
    if folders:
        common = os.path.commonpath(sorted(folders))
        if common != os.path.dirname(common):  # not "/"
            roots.append(common)
    return roots


def _netloc(scheme: str, netloc: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or {"http": 80, "https": 443}.get(scheme)


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's Origin header names the host the request was sent to (scheme aside: a
    TLS-terminating proxy in front makes https://name the origin of http://name requests)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False
    mine = _netloc(parts.scheme, parts.netloc)
    theirs = _netloc(parts.scheme, host)
    if mine is None or theirs is None:
        return False
    if mine == theirs:
        return True
    # behind a proxy the Host may carry the other scheme's default port (or none)
    return mine[0] == theirs[0] and {mine[1], theirs[1]} <= {80, 443}


class SameOriginWrites:
    """Refuse any state-changing request (all methods but GET, HEAD, OPTIONS) that a browser sent
    for a page of another origin: a form post from any web site reaches a server on the
    visitor's loopback, and a multipart post needs no CORS preflight. Browsers send ``Origin``
    with every such request (``Sec-Fetch-Site`` too, in current ones); clients that are not
    browsers (curl, scripts) send neither and are not affected."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site")
            if (origin is not None and not same_origin(origin, headers.get("host"))) or site in ("cross-site", "same-site"):
                response = JSONResponse({"detail": "cross-origin request refused: this server only accepts "
                                                   "POST and DELETE from its own page or from non-browser clients"},
                                        403, headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def human_label(name: str) -> str:
    """What the page calls an attribute or field: ``baseColour`` → "Base colour",
    ``sleeve_length`` → "Sleeve length", ``item_id`` → "Item id" (acronyms such as SKU kept)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    words = re.sub(r"[_\-.]+", " ", spaced).split()
    text = " ".join(w if len(w) > 1 and w.isupper() else w.lower() for w in words)
    return text[:1].upper() + text[1:] if text else name


def unknown_parameter(name: str, value: str, known: Sequence[str]) -> RequestValidationError:
    """The 422 FastAPI gives a malformed parameter, for one it does not know at all."""
    return RequestValidationError([{
        "type": "unknown_parameter", "loc": ("query", name), "input": value,
        "msg": f"unknown query parameter {files_quote(name, 80)}; this endpoint takes {', '.join(known) or 'none'}",
    }])


def declared_query_parameters(dependant) -> set[str]:
    """Query parameter names a route declares, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= declared_query_parameters(sub)
    return names


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"


def index_signature(index_dir: str | Path) -> tuple[int, int, int] | None:
    """What changes when a writer commits: index.json is replaced by a rename (a new inode)."""
    try:
        info = os.stat(Path(index_dir) / "index.json")
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def create_app(index_dir: str | Path, embedder: Embedder, api_key: str | None = None,
               limits: Limits | None = None, allowed_hosts: Sequence[str] | None = None,
               allow_writes_without_key: bool = False, reload_interval: float | None = 2.0) -> FastAPI:
    """``allowed_hosts``: the names clients reach the server by (Host header), DEFAULT_ALLOWED_HOSTS
    if None; ``"*"`` turns the check off. Writes (POST/DELETE /items) need ``api_key``, or
    ``allow_writes_without_key`` (still refused from another site's page). ``reload_interval``:
    at most this often (seconds) a request checks whether another process committed a newer
    generation of the index, which is then opened in the background and swapped in; None: never."""
    limits = limits or Limits()
    seen_signature = index_signature(index_dir)
    catalog = CatalogIndex.open(index_dir)
    if catalog.dim != embedder.feat_dim:
        raise ValueError(f"{index_dir}: index vectors have {catalog.dim} dimensions, the model gives "
                         f"{embedder.feat_dim}: build the index with this model")
    lock = threading.RLock()  # searches and writes see a consistent index
    # at most max_concurrent uploads decoded at once, and together within max_decode_bytes; thread
    # semaphores, not asyncio ones: they work whichever event loop (or test client) calls
    slots = threading.BoundedSemaphore(limits.max_concurrent)
    budget = MemoryBudget(limits.max_decode_bytes)

    def bounded(function, *args):
        with slots:
            return function(*args)

    uploads_dir = Path(index_dir).resolve().parent / (Path(index_dir).name + "-uploads")
    image_roots = catalog_roots(catalog, uploads_dir)

    # ---- picking up what `index add` / `index remove` (or a second server) commit ----------
    next_check = 0.0
    reloading = threading.Lock()  # one background open at a time

    def swap_in_newer() -> None:
        nonlocal catalog, image_roots, seen_signature
        try:
            signature = index_signature(index_dir)
            fresh = CatalogIndex.open(index_dir)  # verified like any open, under the index lock
        except (StoreError, OSError) as exc:  # half-deleted, unreadable: keep serving what we have
            _log.warning("%s: newer index not loaded (%s); serving generation %s", index_dir, exc, catalog.generation)
            return
        finally:
            reloading.release()
        if fresh.dim != catalog.dim or fresh.model_records != catalog.model_records or fresh.flip != catalog.flip:
            # the server's embedder embeds queries for the index it opened (model and --flip)
            _log.error("%s: rebuilt with another model or --flip; restart the server to serve it", index_dir)
            with lock:
                seen_signature = signature
            return
        with lock:
            if (fresh.generation or 0) > (catalog.generation or 0):
                catalog, image_roots = fresh, catalog_roots(fresh, uploads_dir)
                _log.info("%s: serving generation %s (%d items)", index_dir, fresh.generation, len(fresh))
            seen_signature = signature

    def notice_newer_index() -> None:
        """Costs one stat() per ``reload_interval``; the reopen runs on its own thread."""
        nonlocal next_check
        if reload_interval is None or time.monotonic() < next_check:
            return
        next_check = time.monotonic() + reload_interval
        if index_signature(index_dir) != seen_signature and reloading.acquire(blocking=False):
            threading.Thread(target=swap_in_newer, name="index-reload", daemon=True).start()

    declared: dict[int, set[str]] = {}  # id(route) → its query parameters (routes are not hashable)

    def reject_unknown_query_parameters(request: Request) -> None:
        """A parameter no endpoint reads is a mistake to report (a misspelt filter would
        otherwise widen the search silently). /search checks its own: its filter fields."""
        route = request.scope.get("route")
        if route is None or getattr(route, "path", None) == "/search":
            return
        known = declared.get(id(route))
        if known is None:
            known = declared[id(route)] = declared_query_parameters(route.dependant)
        for name, value in request.query_params.multi_items():
            if name not in known:
                raise unknown_parameter(name, value, sorted(known))

    app = FastAPI(title="fashion-retrieval", version="1",
                  description="Search a fashion catalog by photo, optionally within one attribute and "
                              "restricted by metadata filters.",
                  dependencies=[Depends(notice_newer_index), Depends(reject_unknown_query_parameters)])
    # the last added runs first: a foreign Host is refused before anything else looks at the request
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(SameOriginWrites)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or DEFAULT_ALLOWED_HOSTS),
                       www_redirect=False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def require_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        if api_key is None and not allow_writes_without_key:
            raise HTTPException(403, "writes are off: start the server with --api-key-env VAR "
                                     "(or --allow-writes-without-key)")
        if api_key is not None and not (x_api_key and hmac.compare_digest(x_api_key.encode(), api_key.encode())):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    # The model runs on one dedicated thread: requests queue for it holding only their small
    # preprocessed tensor, while decoding (and refusing bad uploads) goes on in the thread pool.
    # One thread also keeps torch's per-thread allocator caches from multiplying under load.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def decode_and_preprocess(data: bytes, keep_photo: bool):
        # the photo is dropped inside the reservation: only the model's small input (and the
        # display copy's JPEG bytes) outlive it
        return decode_upload(data, limits, budget, lambda photo: (
            embedder.batch([photo]), shown_copy(photo) if keep_photo else None))

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
        names = catalog.spaces if catalog.attribute_conditioned else []
        return {"attribute_conditioned": catalog.attribute_conditioned, "attributes": names,
                "labels": {name: human_label(name) for name in names}}

    @app.get("/filters")
    def filters() -> dict[str, Any]:
        """The filter fields of this catalog and, for each with at most MAX_FACET_VALUES
        distinct values, how many items hold each value."""
        with lock:
            fields = catalog.filter_fields()
            counts = catalog.facets()
        return {"fields": fields, "labels": {name: human_label(name) for name in fields},
                "values": {name: values for name, values in counts.items() if len(values) <= MAX_FACET_VALUES}}

    def search_filter(request: Request, ids: list[str] | None) -> SearchFilter | None:
        """Filter fields from the query string (FIELD=VALUE, repeated for either value) and the
        allowed ids; an unknown field is a 422 naming it."""
        fields: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            if name not in SEARCH_PARAMETERS:
                fields.setdefault(name, []).append(value)
        try:
            where = SearchFilter.build(fields, ids)
            if where is not None:
                with lock:
                    where.check_fields(catalog.filter_fields())
        except FilterError as exc:
            # the user's spelling of the field: "attributes.x" is reported as given, not as "x"
            name = next((n for n in fields if exc.field in (n, n.removeprefix("attributes."))), exc.field)
            raise RequestValidationError([{"type": "unknown_parameter", "loc": ("query", name),
                                           "msg": f"{exc} (or one of {', '.join(SEARCH_PARAMETERS)})",
                                           "input": fields.get(name)}]) from None
        return where

    @app.post("/search")
    async def search(request: Request, image: Annotated[UploadFile, File(description="the query photo")],
                     k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
                     attribute: Annotated[str | None, Query(max_length=200)] = None,
                     ids: Annotated[list[str] | None, Query(description="allowed item ids (repeat the parameter)")] = None,
                     ids_form: Annotated[str | None, Form(alias="ids", description="allowed item ids, one per line "
                                                          "(for lists too long for a URL)")] = None,
                     query_expansion: Annotated[str | None, Query(
                         max_length=40, description="k,alpha: search again with the query expanded by its k "
                                                   "nearest items (α-QE, e.g. 5,3); off by default")] = None
                     ) -> dict[str, Any]:
        started = time.perf_counter()
        if ids_form is not None:
            ids = (ids or []) + [line.strip() for line in ids_form.splitlines() if line.strip()]
        expansion = None
        if query_expansion is not None:
            from ..rerank import QueryExpansion, RerankError

            try:
                expansion = QueryExpansion.parse(query_expansion)
            except RerankError as exc:
                raise HTTPException(400, str(exc)) from None
            if expansion.k > limits.max_k:
                raise HTTPException(400, f"--query-expansion: k must be at most {limits.max_k}")
        where = search_filter(request, ids)
        try:
            catalog.store(attribute)  # refuse an unknown attribute before decoding anything
        except UnknownSpaceError as exc:
            raise HTTPException(400, str(exc)) from None
        pixels, _ = await read_upload(image)
        vector = await embed(pixels, attribute)
        with lock:
            scores, found = catalog.search(vector, k, attribute, where, query_expansion=expansion)
            rows = result_rows(scores[0], found[0])
        return {"attribute": attribute, "k": k, "filters": where.to_dict() if where is not None else None,
                **({"query_expansion": expansion.to_dict()} if expansion is not None else {}),
                "results": rows, "took_ms": round(1e3 * (time.perf_counter() - started), 2)}

    # ``:path`` so that ids containing "/" (quoted as %2F in image_url) still reach the lookup;
    # the id is only ever a key into the metadata, never part of a file path
    @app.get("/items/{item_id:path}/image")
    def item_image(item_id: str):
        with lock:
            meta = catalog.get_metadata(item_id)
        recorded = meta.get("path") if meta else None
        found = open_image_file(recorded, image_roots) if isinstance(recorded, str) and recorded else None
        if found is None:
            raise HTTPException(404, f"no image for item '{item_id}'")
        file, media_type, size = found
        return StreamingResponse(_chunks(file), media_type=media_type,
                                 headers={"Content-Length": str(size), "X-Content-Type-Options": "nosniff"})

    def store_upload(shown: bytes, item_id: str) -> Path:
        uploads_dir.mkdir(parents=True, exist_ok=True)
        stored = uploads_dir / (hashlib.sha256(item_id.encode()).hexdigest()[:32] + ".jpg")
        atomic.write_bytes(stored, shown)
        return stored

    def serve_what_is_on_disk() -> None:
        """After a failed save: a change the client is told failed must not stay searchable, nor
        be saved later with someone else's request; another writer's changes are picked up."""
        nonlocal catalog, image_roots, seen_signature
        try:
            seen_signature = index_signature(index_dir)
            catalog = CatalogIndex.open(index_dir)
            image_roots = catalog_roots(catalog, uploads_dir)
        except (StoreError, OSError):
            pass  # nothing better to serve than what is in memory

    def save_or_conflict() -> None:
        nonlocal seen_signature
        try:
            catalog.save()
            seen_signature = index_signature(index_dir)  # our own commit: nothing to reload
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
        pixels, shown = await read_upload(image, keep_photo=True)
        vectors = {space: await embed(pixels, space if catalog.attribute_conditioned else None)
                   for space in catalog.spaces}
        try:
            stored = await run_in_threadpool(store_upload, shown, item_id)
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
