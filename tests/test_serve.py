"""The HTTP API through FastAPI's TestClient: searches, limits, errors, path safety, API key."""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import io
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from catalog_fixtures import ATTRIBUTES, jpeg_bytes, model_ranking, photo_like, save_tiny_checkpoint, write_catalog
from fashion_retrieval.index.build import build_index
from fashion_retrieval.index.catalog import CatalogIndex
from fashion_retrieval.serve.app import Limits, create_app
from fashion_retrieval.serve.embedders import TorchEmbedder

API_KEY = "correct horse battery staple"
LOCAL = "http://127.0.0.1"  # the Host a local client sends; TestClient's default "testserver" is refused


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-plain")
    checkpoint = save_tiny_checkpoint(root / "run", "global_net")
    photos = write_catalog(root / "catalog", 10)
    build_index(checkpoint, root / "catalog", root / "index", progress=False)
    return root, checkpoint, photos, TorchEmbedder(root / "index" / "model")


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-conditioned")
    checkpoint = save_tiny_checkpoint(root / "run", "asen")
    photos = write_catalog(root / "catalog", 10)
    build_index(checkpoint, root / "catalog", root / "index", progress=False)
    return root, checkpoint, photos, TorchEmbedder(root / "index" / "model")


@pytest.fixture(scope="module")
def client(plain):
    root, _, _, embedder = plain
    return TestClient(create_app(root / "index", embedder), base_url=LOCAL)


def upload(data: bytes, name: str = "query.jpg", content_type: str = "image/jpeg"):
    return {"image": (name, data, content_type)}


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in str(detail), detail


def test_search_returns_sorted_results_with_working_image_urls(client, plain):
    _, checkpoint, photos, _ = plain
    query = photos[3]
    response = client.post("/search", params={"k": 10}, files=upload(query.read_bytes()))
    assert response.status_code == 200, response.text
    answer = response.json()
    results = answer["results"]
    assert len(results) == 10 and answer["k"] == 10 and answer["took_ms"] > 0
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["id"] == query.stem and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [r["id"] for r in results] == model_ranking(checkpoint, query, photos)
    assert "path" not in results[0]["metadata"]  # the server never tells where its files are
    image = client.get(results[1]["image_url"])
    assert image.status_code == 200
    assert image.content == (query.parent / f"{results[1]['id']}.jpg").read_bytes()
    assert image.headers["content-type"] == "image/jpeg"
    assert len(client.post("/search", params={"k": 3}, files=upload(query.read_bytes())).json()["results"]) == 3


def test_health_and_page(client):
    health = client.get("/health").json()
    assert health == {"status": "ok", "items": 10, "spaces": ["default"], "model": "global_net"}
    assert client.get("/attributes").json() == {"attribute_conditioned": False, "attributes": [], "labels": {}}
    page = client.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text
    assert client.get("/app.js").status_code == 200


def test_bad_uploads_get_json_errors_with_the_right_status(client):
    assert_error(client.post("/search", files=upload(b"")), 400, "empty upload")
    assert_error(client.post("/search", files=upload(b"just some text\n" * 20, "notes.txt", "text/plain")),
                 415, "not an image")
    truncated = jpeg_bytes(photo_like(5), quality=95)
    assert_error(client.post("/search", files=upload(truncated[: len(truncated) // 2])), 400, "unreadable image")
    assert_error(client.post("/search"), 422)  # no file at all
    assert_error(client.post("/search", params={"k": 0}, files=upload(jpeg_bytes(photo_like(1)))), 422)
    assert_error(client.post("/search", params={"k": 10**6}, files=upload(jpeg_bytes(photo_like(1)))), 422)
    assert_error(client.post("/search", params={"attribute": "colour"}, files=upload(jpeg_bytes(photo_like(1)))),
                 400, "no attribute spaces")


def test_oversized_bodies_are_refused_declared_or_streamed(plain):
    root, _, _, embedder = plain
    small = TestClient(create_app(root / "index", embedder, limits=Limits(max_upload_bytes=20_000)), base_url=LOCAL)
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, "PNG")
    assert len(buffer.getvalue()) > 20_000 + 64 * 1024
    assert_error(small.post("/search", files=upload(buffer.getvalue(), "big.png", "image/png")), 413,
                 "request body larger than")

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(100):
            yield b"x" * 10_000

    response = small.post("/search", content=chunks(),
                          headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(response, 413, "request body larger than")
    # a file just over the upload limit but within the body allowance is refused by the upload check
    assert_error(small.post("/search", files=upload(b"\xff" * 20_001)), 413, "upload larger than")
    assert small.post("/search", files=upload(jpeg_bytes(photo_like(2)))).status_code == 200


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header says ``width`` x ``height``: a decoder that trusts it allocates GBs."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def test_decompression_bombs_are_refused_before_decoding(plain, client):
    root, _, _, embedder = plain
    # a real 8000x8000 image that compresses to a few kilobytes
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, "PNG", optimize=True)
    assert len(buffer.getvalue()) < 100_000
    strict = TestClient(create_app(root / "index", embedder, limits=Limits(max_pixels=1_000_000)), base_url=LOCAL)
    assert_error(strict.post("/search", files=upload(buffer.getvalue(), "bomb.png", "image/png")), 413,
                 "8000x8000", "exceeds")
    # a forged header claiming 30000x30000 pixels, against the default limits
    assert_error(client.post("/search", files=upload(png_claiming(30000, 30000), "forged.png", "image/png")),
                 413, "too large")


@pytest.mark.parametrize("path", [
    "/items/..%2F..%2Fetc%2Fpasswd/image",
    "/items/%2Fetc%2Fpasswd/image",
    "/items/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd/image",
    "/items/item001%2F..%2F..%2Fetc%2Fpasswd/image",
    "/items/no/such/item/image",
    "/items/../../etc/passwd/image",
    "/..%2F..%2Fetc%2Fpasswd",
    "/%2Fetc%2Fpasswd",
])
def test_path_tricks_never_serve_files(client, path):
    response = client.get(path)
    assert response.status_code == 404, response.text
    assert b"root:" not in response.content


def test_only_image_files_recorded_in_the_index_are_served(plain, tmp_path):
    root, _, photos, embedder = plain
    import shutil

    index = tmp_path / "index"
    shutil.copytree(root / "index", index)
    catalog = CatalogIndex.open(index)
    vector = embedder.embed([Image.open(photos[0]).convert("RGB")])
    catalog.add("default", ["evil"], vector, [{"item_id": "evil", "path": "/etc/passwd"}])
    catalog.save()
    evil = TestClient(create_app(index, embedder), base_url=LOCAL)
    results = evil.post("/search", files=upload(photos[0].read_bytes())).json()["results"]
    assert "evil" in [r["id"] for r in results]
    response = evil.get("/items/evil/image")
    assert response.status_code == 404 and b"root:" not in response.content


def test_write_endpoints_need_the_api_key(plain, tmp_path):
    root, _, photos, embedder = plain
    import shutil

    index = tmp_path / "index"
    shutil.copytree(root / "index", index)
    client = TestClient(create_app(index, embedder, api_key=API_KEY), base_url=LOCAL)
    new_photo = jpeg_bytes(photo_like(500))
    form = {"item_id": "shop/sku-500", "category": "dress"}
    assert_error(client.post("/items", files=upload(new_photo), data=form), 401, "X-API-Key")
    assert_error(client.post("/items", files=upload(new_photo), data=form, headers={"X-API-Key": "wrong"}), 401)
    assert client.get("/health").json()["items"] == 10

    created = client.post("/items", files=upload(new_photo), data=form, headers={"X-API-Key": API_KEY})
    assert created.status_code == 201, created.text
    assert created.json()["items"] == 11
    found = client.post("/search", files=upload(new_photo)).json()["results"][0]
    assert found["id"] == "shop/sku-500" and found["metadata"]["category"] == "dress"
    image = client.get(found["image_url"])  # an id with a slash, quoted in the URL
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (96, 128)
    assert "shop/sku-500" in CatalogIndex.open(index).stores["default"]  # saved to disk

    assert_error(client.delete("/items/shop%2Fsku-500"), 401)
    deleted = client.delete("/items/shop%2Fsku-500", headers={"X-API-Key": API_KEY})
    assert deleted.status_code == 200 and deleted.json() == {"removed": "shop/sku-500", "items": 10}
    ids = [r["id"] for r in client.post("/search", files=upload(new_photo)).json()["results"]]
    assert "shop/sku-500" not in ids
    assert client.get(found["image_url"]).status_code == 404
    assert_error(client.delete("/items/shop%2Fsku-500", headers={"X-API-Key": API_KEY}), 404, "no item")
    assert len(CatalogIndex.open(index)) == 10


def test_a_conflicting_writer_is_reported_not_overwritten(plain, tmp_path):
    root, _, photos, embedder = plain
    import shutil

    index = tmp_path / "index"
    shutil.copytree(root / "index", index)
    # reload_interval=None: the server has not picked up the other writer's generation yet (the
    # test below covers that it does)
    client = TestClient(create_app(index, embedder, allow_writes_without_key=True, reload_interval=None),
                        base_url=LOCAL)
    other = CatalogIndex.open(index)  # e.g. an `index remove` run while the server is up
    other.remove(["item000"])
    other.save()
    response = client.post("/items", files=upload(jpeg_bytes(photo_like(600))), data={"item_id": "x"})
    assert_error(response, 409, "another writer")
    assert "item000" not in CatalogIndex.open(index).stores["default"]
    # the server now serves the other writer's index, without the item it answered 409 for
    found = [r["id"] for r in client.post("/search", params={"k": 20}, files=upload(jpeg_bytes(photo_like(600))))
             .json()["results"]]
    assert len(found) == 9 and "x" not in found and "item000" not in found


def test_the_server_picks_up_index_add_and_remove_without_a_restart(plain, tmp_path):
    from fashion_retrieval.index.build import add_to_index, remove_from_index

    root, _, photos, embedder = plain
    index = writable_copy(plain, tmp_path)
    client = TestClient(create_app(index, embedder, reload_interval=0), base_url=LOCAL)

    def items_once_reloaded(expected: int) -> int:
        deadline = time.monotonic() + 60
        while (count := client.get("/health").json()["items"]) != expected and time.monotonic() < deadline:
            time.sleep(0.05)  # each request checks; the reopen runs in the background
        return count

    assert client.get("/health").json()["items"] == 10
    assert remove_from_index(index, [photos[0].stem]) == 1  # `index remove` from the command line
    assert items_once_reloaded(9) == 9
    query = upload(jpeg_bytes(photo_like(0)))
    assert photos[0].stem not in [r["id"] for r in client.post("/search", params={"k": 20}, files=query).json()["results"]]
    new = write_catalog(tmp_path / "new", 2, first_seed=700, prefix="new")
    add_to_index(index, tmp_path / "new", progress=False)  # `index add`
    assert items_once_reloaded(11) == 11
    found = client.post("/search", params={"k": 1}, files=upload(new[1].read_bytes())).json()["results"]
    assert found[0]["id"] == new[1].stem and client.get(found[0]["image_url"]).status_code == 200


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


@contextlib.contextmanager
def running_server(index: Path, *options: str):
    """`fashion-retrieval serve` as a user starts it, on a free loopback port; yields the port."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fashion_retrieval", "serve", "--index", str(index),
                               "--port", str(port), "--log-level", "warning", *options],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.2)
        yield port
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_serve_command_listens_on_loopback_only(plain):
    """`fashion-retrieval serve` as a user starts it: answers on 127.0.0.1 and binds nothing else."""
    root, _, photos, _ = plain
    with running_server(root / "index") as port:
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.json()["items"] == 10
        assert listening_addresses(port) == {"127.0.0.1"}
        answer = httpx.post(f"http://127.0.0.1:{port}/search", files=upload(photos[2].read_bytes()), timeout=30)
        assert answer.json()["results"][0]["id"] == photos[2].stem


def test_slow_clients_are_disconnected_within_the_configured_timeouts(plain):
    """Slow-loris clients against the real server: silent, headers or body a byte at a time, idle."""
    import select
    import socket

    root, _, _, _ = plain
    header_timeout, body_timeout, keep_alive = 2.0, 3.0, 1.0
    with running_server(root / "index", "--header-timeout", str(header_timeout), "--body-timeout",
                        str(body_timeout), "--keep-alive-timeout", str(keep_alive), "--limit-concurrency", "5") as port:
        url = f"http://127.0.0.1:{port}/health"
        opened = {name: socket.create_connection(("127.0.0.1", port), timeout=5)
                  for name in ("silent", "headers", "body", "idle")}
        started = time.monotonic()
        opened["headers"].sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        opened["body"].sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                               b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n")
        opened["idle"].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # four connections held: a fifth request is over --limit-concurrency
        assert httpx.get(url, timeout=10).status_code == 503
        closed_after: dict[str, float] = {}
        received = {name: b"" for name in opened}
        last_trickle = 0.0
        while len(closed_after) < len(opened) and time.monotonic() - started < 15:
            if time.monotonic() - last_trickle > 0.25:  # each trickled byte must not extend a deadline
                last_trickle = time.monotonic()
                for name in ("headers", "body"):
                    if name not in closed_after:
                        try:
                            opened[name].send(b"X-Slow: 1\r\n" if name == "headers" else b"a")
                        except OSError:
                            pass
            alive = [s for name, s in opened.items() if name not in closed_after]
            for sock in select.select(alive, [], [], 0.05)[0]:
                name = next(n for n, s in opened.items() if s is sock)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                received[name] += data
                if not data:
                    closed_after[name] = time.monotonic() - started
        for sock in opened.values():
            sock.close()
        assert set(closed_after) == set(opened), f"still open after 15 s: {set(opened) - set(closed_after)}"
        slack = 3.0  # two shared cores: the server's loop may answer late, never early
        for name, limit in (("silent", header_timeout), ("headers", header_timeout), ("body", body_timeout),
                            ("idle", keep_alive)):
            assert limit - 0.5 <= closed_after[name] <= limit + slack, (name, closed_after)
        for name in ("silent", "headers", "body"):
            assert received[name].startswith(b"HTTP/1.1 408 "), (name, received[name][:80])
        assert received["idle"].startswith(b"HTTP/1.1 200 ")
        assert httpx.get(url, timeout=10).status_code == 200  # their places are free again


def test_serve_command_errors_are_one_line(tmp_path):
    from fashion_retrieval.cli import app

    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "no such index directory" in result.stderr
    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--api-key-env", "FR_TEST_UNSET_KEY"],
                                env={"FR_TEST_UNSET_KEY": ""})
    assert result.exit_code == 2 and "FR_TEST_UNSET_KEY is empty or unset" in result.stderr


def test_server_binds_loopback_by_default():
    from fashion_retrieval.cli import app
    from fashion_retrieval.serve import cli

    assert inspect.signature(cli.serve).parameters["host"].default == "127.0.0.1"
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).stdout
    assert "127.0.0.1" in help_text


def test_attribute_conditioned_app(conditioned):
    root, checkpoint, photos, embedder = conditioned
    client = TestClient(create_app(root / "index", embedder), base_url=LOCAL)
    assert client.get("/attributes").json() == {"attribute_conditioned": True, "attributes": ATTRIBUTES,
                                                "labels": {"colour": "Colour", "sleeve": "Sleeve"}}
    query = photos[6]
    rankings = {}
    for attribute in ATTRIBUTES:
        response = client.post("/search", params={"attribute": attribute, "k": 10}, files=upload(query.read_bytes()))
        assert response.status_code == 200, response.text
        assert response.json()["attribute"] == attribute
        rankings[attribute] = [r["id"] for r in response.json()["results"]]
        assert rankings[attribute] == model_ranking(checkpoint, query, photos, attribute)
    assert rankings["colour"] != rankings["sleeve"]
    assert_error(client.post("/search", params={"attribute": "pattern"}, files=upload(query.read_bytes())),
                 400, "unknown attribute 'pattern'")
    assert_error(client.post("/search", files=upload(query.read_bytes())), 400, "choose one of colour, sleeve")


# ---- catalog photos: only regular image files inside the recorded folders (issue 21) ----

SECRET = b"root:$6$not-a-real-hash:19000:0:99999:7:::\n"


def own_index(plain, tmp_path: Path, count: int = 10) -> list[Path]:
    """A fresh catalog and index in ``tmp_path`` (their files may be tampered with)."""
    _, checkpoint, _, _ = plain
    photos = write_catalog(tmp_path / "catalog", count)
    build_index(checkpoint, tmp_path / "catalog", tmp_path / "index", progress=False)
    return photos


def image_of(client, item_id: str):
    from fashion_retrieval.serve.app import image_url

    return client.get(image_url(item_id))


def test_index_records_the_catalog_folder(plain, tmp_path):
    own_index(plain, tmp_path, 3)
    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert manifest["catalog_roots"] == [os.path.realpath(tmp_path / "catalog")]
    assert CatalogIndex.open(tmp_path / "index").catalog_roots == manifest["catalog_roots"]


def test_index_add_records_the_added_folder_and_its_photos_are_served(plain, tmp_path):
    from fashion_retrieval.index.build import _catalog_roots, add_to_index

    _, _, _, embedder = plain
    own_index(plain, tmp_path, 3)
    more = write_catalog(tmp_path / "more", 2, first_seed=50, prefix="extra")
    add_to_index(tmp_path / "index", tmp_path / "more", progress=False)
    roots = CatalogIndex.open(tmp_path / "index").catalog_roots
    assert roots == sorted([os.path.realpath(tmp_path / "catalog"), os.path.realpath(tmp_path / "more")])
    client = TestClient(create_app(tmp_path / "index", embedder), base_url=LOCAL)
    assert image_of(client, more[1].stem).content == more[1].read_bytes()
    # a CSV naming files elsewhere adds their own folders, never a wider one
    assert _catalog_roots([], Path("/data/csv"), ["/data/csv/a/1.jpg", "/srv/x/2.jpg", "/srv/x/y/3.jpg"]) == \
        ["/data/csv", "/srv/x"]


@pytest.mark.skipif(not hasattr(os, "symlink") or not hasattr(os, "mkfifo"), reason="needs POSIX links and FIFOs")
def test_catalog_photos_swapped_for_links_or_other_files_are_not_served(plain, tmp_path):
    _, _, _, embedder = plain
    photos = own_index(plain, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    private = jpeg_bytes(photo_like(900))
    (outside / "private.jpg").write_bytes(private)
    client = TestClient(create_app(tmp_path / "index", embedder), base_url=LOCAL)
    assert image_of(client, photos[0].stem).content == photos[0].read_bytes()

    swaps = {
        photos[0]: lambda p: p.symlink_to(outside / "shadow"),  # the attack: a secret behind a photo's name
        photos[1]: lambda p: p.symlink_to(outside / "private.jpg"),  # a real image, but outside the catalog
        photos[4]: lambda p: os.mkfifo(p),  # would block a reader forever
        photos[5]: lambda p: p.write_bytes(SECRET),  # a regular file inside, but no image
        photos[6]: lambda p: p.mkdir(),
    }
    for photo, swap in swaps.items():
        photo.unlink()
        swap(photo)
    for photo in swaps:
        response = image_of(client, photo.stem)
        assert response.status_code == 404, (photo.name, response.status_code)
        assert SECRET not in response.content and private not in response.content
    # a link to another photo of the catalog is still a photo of the catalog
    target = photos[3].read_bytes()
    photos[2].unlink()
    photos[2].symlink_to(photos[3])
    served = image_of(client, photos[2].stem)
    assert served.status_code == 200 and served.content == target
    assert served.headers["content-type"] == "image/jpeg" and served.headers["x-content-type-options"] == "nosniff"
    # the catalog folder itself replaced by a link to a folder holding the same names
    (outside / photos[7].name).write_bytes(private)
    (tmp_path / "catalog").rename(tmp_path / "catalog-moved")
    (tmp_path / "catalog").symlink_to(outside)
    response = image_of(client, photos[7].stem)
    assert response.status_code == 404 and private not in response.content


def test_an_index_without_recorded_folders_serves_only_below_its_photos_common_folder(plain, tmp_path):
    _, _, _, embedder = plain
    photos = own_index(plain, tmp_path)
    manifest_path = tmp_path / "index" / "index.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["catalog_roots"]  # as written before catalog roots were recorded
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "shadow").write_bytes(SECRET)
    photos[0].unlink()
    photos[0].symlink_to(tmp_path / "shadow")
    client = TestClient(create_app(tmp_path / "index", embedder), base_url=LOCAL)
    assert image_of(client, photos[1].stem).content == photos[1].read_bytes()
    response = image_of(client, photos[0].stem)
    assert response.status_code == 404 and SECRET not in response.content


# ---- writes, Host and Origin (issue 21) ----------------------------------------------------

def writable_copy(plain, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(plain[0] / "index", tmp_path / "index")
    return tmp_path / "index"


def add(client, seed: int, **headers):
    return client.post("/items", files=upload(jpeg_bytes(photo_like(seed))), data={"item_id": f"new-{seed}"},
                       headers=headers)


def assert_foreign_host(response) -> None:
    assert response.status_code == 400 and response.text == "Invalid host header"  # starlette's answer


def test_writes_are_off_without_a_key_and_never_accepted_from_another_site(plain, tmp_path):
    _, _, _, embedder = plain
    index = writable_copy(plain, tmp_path)
    default = TestClient(create_app(index, embedder), base_url=LOCAL)
    # the attacker's page: a multipart form post from http://evil.example, by DNS rebinding or not
    assert_foreign_host(add(default, 700, Origin="http://evil.example", Host="evil.example"))
    assert_error(add(default, 701, Origin="http://evil.example"), 403, "cross-origin")
    assert_error(add(default, 702), 403, "writes are off", "--api-key-env")
    assert_error(default.delete("/items/item000"), 403, "writes are off")
    assert default.get("/health").json()["items"] == 10

    keyed = TestClient(create_app(index, embedder, api_key=API_KEY), base_url=LOCAL)
    own = {"Origin": "http://127.0.0.1", "X-API-Key": API_KEY}
    assert add(keyed, 703, **own).status_code == 201  # the server's own page, with the key
    assert_error(add(keyed, 704, **{**own, "Origin": "http://evil.example"}), 403, "cross-origin")
    assert_error(add(keyed, 705, **own, **{"Sec-Fetch-Site": "cross-site"}), 403, "cross-origin")
    assert_foreign_host(add(keyed, 706, **own, Host="evil.example"))

    opened = TestClient(create_app(index, embedder, allow_writes_without_key=True), base_url=LOCAL)
    assert add(opened, 707).status_code == 201  # curl and scripts send no Origin
    assert add(opened, 708, Origin="http://127.0.0.1").status_code == 201
    for foreign in ("http://evil.example", "null", "http://127.0.0.1.evil.example", "http://127.0.0.1:9999"):
        assert_error(add(opened, 709, Origin=foreign), 403, "cross-origin")
    assert_error(opened.delete("/items/new-707", headers={"Origin": "http://evil.example"}), 403)
    assert sorted(i for i in CatalogIndex.open(index).stores["default"]._meta if i.startswith("new-")) == \
        ["new-703", "new-707", "new-708"]


def test_only_requests_naming_this_server_are_answered(client, plain):
    _, _, photos, _ = plain
    for host in ("127.0.0.1", "127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "[::2]"):
        assert_foreign_host(client.get("/health", headers={"Host": host}))  # DNS rebinding reads
    assert_foreign_host(client.get("/health", headers={"Host": "testserver"}))
    # searches are not writes, but a foreign page's post is refused all the same
    assert_error(client.post("/search", files=upload(photos[0].read_bytes()),
                             headers={"Origin": "http://evil.example"}), 403)
    root, _, _, embedder = plain
    named = TestClient(create_app(root / "index", embedder, allowed_hosts=["shop.example"]),
                       base_url="http://shop.example")
    assert named.get("/health").status_code == 200
    assert named.post("/search", files=upload(photos[0].read_bytes()),
                      headers={"Origin": "https://shop.example"}).status_code == 200  # behind a TLS proxy
    assert_foreign_host(named.get("/health", headers={"Host": "127.0.0.1"}))


# ---- memory of one decode (issue 21) -----------------------------------------------------------

def png_16_bit(width: int, height: int) -> bytes:
    """A real 16-bit grayscale PNG of one repeated row, written row by row: a few hundred KB that
    decode to width·height·2 bytes, and to 8 times that through a float64 conversion."""
    row = b"\x00" + np.random.default_rng(0).integers(256, 65536, width, dtype=np.uint16).astype(">u2").tobytes()
    packer = zlib.compressobj(6)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


MEMORY_PROBE = """
import resource, sys
from pathlib import Path
from fastapi.testclient import TestClient
from fashion_retrieval.serve.app import create_app, upload_cost, Limits
from fashion_retrieval.serve.embedders import TorchEmbedder

index, big, small = sys.argv[1:4]
client = TestClient(create_app(index, TorchEmbedder(Path(index) / "model")), base_url="http://127.0.0.1")
send = lambda path: client.post("/search", files={"image": ("photo.png", Path(path).read_bytes(), "image/png")})
assert send(small).status_code == 200  # every code path warm: only the big decode can raise the peak
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
answer = send(big)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(answer.status_code, grown, upload_cost(big, Limits()))
"""


def test_a_small_16_bit_upload_decodes_within_its_memory_estimate(plain, tmp_path):
    """The upload of issue 21: 6300x6300 16-bit, a few hundred KB, cost about 1 GB to decode."""
    root, _, _, _ = plain
    big = tmp_path / "big16.png"
    big.write_bytes(png_16_bit(6300, 6300))
    small = tmp_path / "small16.png"
    small.write_bytes(png_16_bit(300, 200))
    assert big.stat().st_size < 1_000_000
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(root / "index"), str(big), str(small)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    status, grown, estimate = map(int, result.stdout.split())
    assert status == 200
    # what the server reserved for it: decode (5 bytes a pixel) or preprocessing (10), ≈ 380 MiB
    assert estimate <= 400 * 2**20
    assert grown <= estimate * 1.1 + 32 * 2**20, f"peak grew {grown / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB"


def test_a_decode_over_the_memory_limit_is_refused_from_the_header(plain, tmp_path):
    root, _, _, embedder = plain
    data = png_16_bit(3000, 2000)  # 6 Mpx: fine by pixel count, 57 MiB through the model's preprocessing
    strict = TestClient(create_app(root / "index", embedder, limits=Limits(max_decode_bytes=32 * 2**20)),
                        base_url=LOCAL)
    assert_error(strict.post("/search", files=upload(data, "deep.png", "image/png")), 413,
                 "3000x2000 I;16", "MiB, over the limit of 32 MiB")
    assert strict.post("/search", files=upload(jpeg_bytes(photo_like(3)))).status_code == 200


def test_decodes_wait_for_memory_held_by_others():
    import threading

    from fashion_retrieval.serve.app import MemoryBudget

    budget = MemoryBudget(100)
    order = []
    finish = threading.Event()

    def second() -> None:
        with budget.reserve(40):
            order.append("second")
            finish.wait(5)

    with budget.reserve(70):
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.3)
        assert order == [] and budget.used == 70  # 70 + 40 does not fit: the second waits
        order.append("first done")
    deadline = time.monotonic() + 5
    while budget.used != 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["first done", "second"] and budget.used == 40
    finish.set()
    waiting.join(5)
    assert budget.used == 0
    with pytest.raises(ValueError, match="exceed the whole budget"):
        budget.reserve(101).__enter__()
