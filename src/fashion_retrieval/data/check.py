"""What ``fashion-retrieval data check`` reports: counts of a sample table and unreadable images."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from .images import ImageLoadError, load_rgb
from .table import DOMAINS, SPLITS, SampleTable

SHOWN_UNREADABLE = 20
MAX_CATEGORY_ROWS = 30  # beyond this a per-category table is noise; the count says enough


@dataclass
class DatasetSummary:
    images: int
    items: int
    split_domain: Counter  # (split, domain) -> images
    split_items: Counter  # split -> distinct items
    categories: int
    category_images: Counter  # category -> images
    attributes: dict[str, tuple[int, int]]  # name -> (distinct values, images labelled)
    multi_label: tuple[str, ...]
    bboxes: int


@dataclass
class ImageReport:
    checked: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def summarize(table: SampleTable) -> DatasetSummary:
    labelled = Counter(name for s in table for name, v in s.attributes.items() if v not in ("", ()))
    return DatasetSummary(
        images=len(table),
        items=len({s.item_id for s in table}),
        split_domain=Counter((s.split, s.domain) for s in table),
        split_items=Counter(split for split, _ in {(s.split, s.item_id) for s in table}),
        categories=len(table.categories()),
        category_images=Counter(s.category for s in table if s.category is not None),
        attributes={name: (len(table.attribute_values(name)), labelled[name]) for name in table.attribute_names()},
        multi_label=table.multi_label,
        bboxes=sum(s.bbox is not None for s in table),
    )


def verify_images(table: SampleTable, workers: int = 4,
                  advance: Callable[[], None] | None = None) -> ImageReport:
    """Decode every image (PIL releases the GIL while decoding, so threads do run in parallel)."""
    def reason(path: Path) -> str | None:
        try:
            load_rgb(path)
        except ImageLoadError as exc:
            return exc.reason
        finally:
            if advance is not None:
                advance()
        return None

    paths = table.paths()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(reason, paths))
    return ImageReport(len(paths), [(str(p), r) for p, r in zip(paths, reasons) if r is not None])


def render(console: Console, title: str, summary: DatasetSummary, images: ImageReport | None) -> None:
    console.print(title, markup=False, highlight=False, soft_wrap=True)
    overview = Table(title="overview", show_header=False)
    overview.add_column("what")
    overview.add_column("count", justify="right")
    overview.add_row("images", str(summary.images))
    overview.add_row("items", str(summary.items))
    overview.add_row("categories", str(summary.categories))
    overview.add_row("attributes", str(len(summary.attributes)))
    overview.add_row("bounding boxes", str(summary.bboxes))
    if images is not None:
        overview.add_row("unreadable images", f"{len(images.unreadable)} of {images.checked}")
    else:
        overview.add_row("unreadable images", "not checked (--no-verify-images)")
    console.print(overview)
    console.print(_split_domain_table(summary))
    if 0 < summary.categories <= MAX_CATEGORY_ROWS:
        console.print(_category_table(summary))
    if summary.attributes:
        console.print(_attribute_table(summary))
    if images is not None and images.unreadable:
        console.print(f"Unreadable images ({len(images.unreadable)}; they will be skipped):", highlight=False)
        for path, why in images.unreadable[:SHOWN_UNREADABLE]:
            console.print(f"  {path}: {why}", markup=False, highlight=False, soft_wrap=True)
        if len(images.unreadable) > SHOWN_UNREADABLE:
            console.print(f"  ... and {len(images.unreadable) - SHOWN_UNREADABLE} more", highlight=False)


def _split_domain_table(summary: DatasetSummary) -> Table:
    splits = [s for s in SPLITS if any(k[0] == s for k in summary.split_domain)]
    domains = [d for d in DOMAINS if any(k[1] == d for k in summary.split_domain)]
    table = Table(title="images per split and domain")
    table.add_column("split")
    for domain in domains:
        table.add_column(domain, justify="right")
    table.add_column("images", justify="right")
    table.add_column("items", justify="right")
    for split in splits:
        row = [summary.split_domain[(split, d)] for d in domains]
        table.add_row(split, *map(str, row), str(sum(row)), str(summary.split_items[split]))
    totals = [sum(summary.split_domain[(s, d)] for s in splits) for d in domains]
    table.add_row("total", *map(str, totals), str(sum(totals)), str(summary.items))
    return table


def _category_table(summary: DatasetSummary) -> Table:
    table = Table(title="images per category")
    table.add_column("category")
    table.add_column("images", justify="right")
    for category, count in sorted(summary.category_images.items()):
        table.add_row(category, str(count))
    return table


def _attribute_table(summary: DatasetSummary) -> Table:
    table = Table(title="attributes")
    table.add_column("attribute")
    table.add_column("values", justify="right")
    table.add_column("images labelled", justify="right")
    for name, (values, labelled) in summary.attributes.items():
        suffix = " (multi-label)" if name in summary.multi_label else ""
        table.add_row(name + suffix, str(values), str(labelled))
    return table
