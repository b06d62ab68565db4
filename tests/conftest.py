"""Shared test fixtures: the real data root (skipped when absent) and tiny datasets on disk.

The dataset writers produce the official formats of the shared data in a few kilobytes, so
reader, benchmark and CLI tests run anywhere.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pytest
from PIL import Image

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_path() -> Path:
    return Path(os.environ.get("FASHION_DATA_ROOT", DEFAULT_SHARED_DATA))


# scripts/test.sh runs the suite on several pytest-xdist workers: each gets its share of the
# cores (a worker with 2 torch threads on a 2-core machine beside another one runs slower than
# with 1), and the CLI processes the tests start inherit it through OMP_NUM_THREADS.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
TEST_THREADS = max(1, min(2, CORES // XDIST_WORKERS))
if XDIST_WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)

# Two embedded Milvus servers on one machine cannot both start (the second waits until its
# timeout), so every test that uses the session's server runs on one worker, chosen by name:
# the scheduler sees node ids only. Collection refuses a server test whose name does not say so.
MILVUS_SERVER_NAMES = ("milvus_server", "milvus-server")


def uses_milvus_server(nodeid: str) -> bool:
    return any(name in nodeid.split("::", 1)[-1] for name in MILVUS_SERVER_NAMES)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole test files per worker, so their module fixtures (trained tiny runs, indexes) are
    built once, and one unit for the Milvus server tests. (xdist's own --dist loadgroup cannot
    be used: with pytest 9 its group suffix no longer reaches the node ids.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return MILVUS_SERVER_NAMES[0] if uses_milvus_server(nodeid) else nodeid.split("::", 1)[0]

    return FileScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    if XDIST_WORKERS > 1:
        import torch

        torch.set_num_threads(TEST_THREADS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {}).values()
        if ("milvus_server_uri" in getattr(item, "fixturenames", ()) or "milvus-server" in params) \
                and not uses_milvus_server(item.nodeid):
            raise pytest.UsageError(f"{item.nodeid}: a test of the Milvus server needs one of "
                                    f"{MILVUS_SERVER_NAMES} in its name (see tests/conftest.py)")
    if shared_data_path().is_dir():
        return
    skip = pytest.mark.skip(reason=f"shared data not found at {shared_data_path()} (set FASHION_DATA_ROOT)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    root = shared_data_path()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set FASHION_DATA_ROOT)")
    return root


def write_jpeg(path: str | Path, size: tuple[int, int] = (12, 16), color: tuple[int, int, int] = (180, 40, 40),
               **save_options) -> Path:
    """A tiny real JPEG (size is width, height); parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", **save_options)
    return path


def write_truncated_jpeg(path: str | Path) -> Path:
    """A JPEG cut in the middle of its scan data: the header reads, decoding fails."""
    full = write_jpeg(path, size=(64, 64), color=(10, 200, 30), quality=95)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    return full


@pytest.fixture
def make_jpeg() -> Callable[..., Path]:
    return write_jpeg


STYLES_HEADER = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year",
                 "usage"]

# id, gender, masterCategory, subCategory, articleType, baseColour, season, year, usage
TINY_STYLES = [
    ["10", "Men", "Apparel", "Topwear", "Tshirts", "Blue", "Summer", "2011", "Casual"],
    ["11", "Men", "Apparel", "Topwear", "Tshirts", "Red", "Summer", "2012", "Casual"],
    ["15", "Women", "Apparel", "Topwear", "Tshirts", "Blue", "Fall", "2012", ""],
    ["20", "Women", "Apparel", "Dress", "Dresses", "", "Fall", "2013", "Party"],
    ["25", "Men", "Footwear", "Shoes", "Casual Shoes", "Black", "Winter", "2011", "Casual"],
    ["29", "Women", "Accessories", "Watches", "Watches", "Black", "Winter", "2011", "Casual"],
    ["30", "Men", "Apparel", "Bottomwear", "Jeans", "Blue", "Fall", "2011", "Casual"],
    ["35", "Men", "Footwear", "Shoes", "Sports Shoes", "White", "Summer", "2016", "Sports"],
    ["39", "Women", "Apparel", "Topwear", "Shirts", "White", "Summer", "2016", "Formal"],
    ["40", "Women", "Apparel", "Topwear", "Tops", "Pink", "Summer", "2016", "Casual"],
]


def write_fashion_product(root: str | Path, rows: Iterable[list[str]] = TINY_STYLES,
                          header: list[str] = STYLES_HEADER, images: bool = True) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    with open(root / "styles.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    if images:
        for row in rows:
            write_jpeg(root / "images" / f"{row[0]}.jpg", size=(6, 8), color=(int(row[0]) % 256, 80, 120))
    return root


TINY_CLOTHING = {
    "train": {"dress": 2, "pants": 2, "t-shirt": 3},
    "validation": {"dress": 1, "pants": 2, "t-shirt": 2, "shoes": 1},
}


def write_clothing(root: str | Path, layout: dict[str, dict[str, int]] = TINY_CLOTHING) -> Path:
    root = Path(root)
    for split, categories in layout.items():
        for category, count in categories.items():
            for n in range(count):
                write_jpeg(root / split / category / f"{split}-{category}-{n}.jpg", size=(9, 12))
    return root


def write_viton(root: str | Path, pair_ids: Iterable[str] = ("000010", "000011", "000015", "000019", "000020"),
                ) -> Path:
    root = Path(root)
    pair_ids = list(pair_ids)
    for pair_id in pair_ids:
        write_jpeg(root / "person" / f"{pair_id}.jpg", size=(6, 8), color=(30, 30, 200))
        write_jpeg(root / "product" / f"{pair_id}.jpg", size=(6, 8), color=(200, 30, 30))
    lines = ["pair_id,person,product"] + [f"{p},person/{p}.jpg,product/{p}.jpg" for p in pair_ids]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def tiny_data_root(tmp_path: Path) -> Path:
    """A data root laid out like the shared one: fashion-product/, clothing/, viton/."""
    write_fashion_product(tmp_path / "fashion-product")
    write_clothing(tmp_path / "clothing")
    write_viton(tmp_path / "viton")
    return tmp_path


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory) -> Iterator[str]:
    """URI of a real Milvus server process for the whole session (see milvus_server.py); skipped
    where none can be started."""
    from milvus_server import milvus_server

    try:
        context = milvus_server(tmp_path_factory.mktemp("milvus-server"))
        uri, _ = context.__enter__()
    except (ModuleNotFoundError, RuntimeError) as exc:
        pytest.skip(f"no Milvus server: {exc}")
    try:
        yield uri
    finally:
        context.__exit__(None, None, None)
