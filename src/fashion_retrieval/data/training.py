"""Everything training reads, from one call: :func:`build_training_data`.

``config`` is the recipe (an ``ExperimentConfig``); this module reads its settings without
importing config.py, which sits above the data layer.

The table (the recipe's training split), its label space, the decoded-image cache, the batch
sampler wrapped in a seeded plan, and the dataset that applies each image's augmentation.

Reproducibility is by construction:

- the sampler's epoch plan is a function of ``(seed, epoch)`` (samplers.py);
- each image's augmentation is seeded from ``(seed, epoch, rank, batch position, slot)``, so it
  does not depend on the number of DataLoader workers or on where a run was resumed;
- the DataLoader gets its own generator, so creating one never advances the training RNG.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..registry import ConfigError
from .images import ImageDataset, collate_skipping, default_transform, tensor_stage
from .labels import LabelSpace
from .table import SampleTable

DECODED_CACHE_DIR = "decoded-images"


def sample_seed(seed: int, epoch: int, rank: int, position: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, position, slot]).generate_state(1)[0])


class SeededBatches(Sampler[list]):
    """Wraps a batch sampler: caps an epoch at ``max_steps`` and pairs every key with its
    augmentation seed, so a sample's crop/flip/jitter depends only on where it sits in the plan."""

    def __init__(self, batch_sampler: Any, seed: int, rank: int, max_steps: int | None = None):
        self.batch_sampler = batch_sampler
        self.seed, self.rank, self.max_steps = seed, rank, max_steps
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        self.batch_sampler.set_epoch(self.epoch, 0)
        full = len(self.batch_sampler)
        self.batch_sampler.set_epoch(self.epoch, self.start)
        return min(full, self.max_steps) if self.max_steps else full

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.batch_sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch() - self.start)

    def __iter__(self) -> Iterator[list]:
        remaining = len(self)
        for offset, batch in enumerate(self.batch_sampler):
            if offset >= remaining:
                return
            position = self.start + offset
            yield [(key, sample_seed(self.seed, self.epoch, self.rank, position, slot))
                   for slot, key in enumerate(batch)]


class SeededDataset(Dataset):
    """``dataset[(key, seed)]``: the item for ``key`` with the torch RNG seeded for its augmentation."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, keyed: tuple[Any, int]) -> dict[str, Any]:
        key, seed = keyed
        # fork_rng: with num_workers=0 this runs in the main process, whose RNG drives dropout.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[key]


# ---- table, labels, sampler -------------------------------------------------------------------
def read_table(config: Any, data_root: Path) -> SampleTable:
    from ..data.readers import READERS

    root = Path(data_root) / config.data.root
    if not root.exists():
        raise FileNotFoundError(f"{root}: dataset folder not found (data root {data_root}, data.root "
                                f"'{config.data.root}'); pass --data-root or set FASHION_DATA_ROOT")
    return READERS.build(config.data.format, root=root, **config.data.options)


def training_table(config: Any, data_root: Path) -> SampleTable:
    table = read_table(config, data_root).filter(split=config.data.train_split)
    if config.data.identity == "category":
        # Category-level retrieval: every ID/metric loss then treats a category as one identity.
        table = table.filter(predicate=lambda s: s.category is not None)
        table = SampleTable([replace(s, item_id=s.category) for s in table], table.root, table.name, table.multi_label)
    if len(table) == 0:
        raise ConfigError(f"data.train_split: no images in split(s) {config.data.train_split} of "
                          f"{config.data.format} at {Path(data_root) / config.data.root}"
                          + (" with a category" if config.data.identity == "category" else ""))
    return table


def label_space_for(table: SampleTable, attributes: Sequence[str] | None) -> LabelSpace:
    """The table's label space, restricted to (and ordered as) ``attributes`` when given."""
    full = LabelSpace.from_table(table)
    if attributes is None:
        return full
    unknown = [a for a in attributes if a not in full.attributes]
    if unknown:
        raise ConfigError(f"data.attributes: {', '.join(unknown)} not in the training table "
                          f"(it has: {', '.join(full.attribute_names) or 'no attributes'})")
    return LabelSpace(full.items, full.categories, {a: full.attributes[a] for a in attributes},
                      tuple(a for a in full.multi_label if a in attributes))


def build_sampler(config: Any, table: SampleTable, labels: LabelSpace, rank: int = 0,
                  world_size: int = 1):
    """The recipe's batch sampler (``data.sampler.kind`` in SAMPLERS) for this process's shard."""
    from ..data.samplers import SAMPLERS

    spec = config.data.sampler
    try:
        return SAMPLERS.build(spec.kind, table=table, labels=labels, spec=spec, seed=config.seed, rank=rank,
                              world_size=world_size)
    except ValueError as exc:
        raise ConfigError(f"data.sampler: {exc}") from None


def decoded_cache_for(config: Any, run_dir: Path):
    """The recipe's decoded-image cache (``data.decoded_cache``), or None when it is off."""
    from .image_cache import DecodedImageCache

    where = config.data.decoded_cache
    if where == "off":
        return None
    folder = Path(run_dir) / DECODED_CACHE_DIR if where == "run" else Path(where)
    return DecodedImageCache(folder, config.data.image_size)


@dataclass
class TrainingData:
    """What :func:`build_training_data` returns; ``loader()`` makes the epoch's DataLoader."""

    table: SampleTable
    labels: LabelSpace
    cache: Any  # DecodedImageCache or None
    batches: SeededBatches
    dataset: SeededDataset
    steps_per_epoch: int
    seed: int

    def loader(self, num_workers: int, pin_memory: bool) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.batches, collate_fn=collate_skipping,
                          num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))


def build_training_data(config: Any, data_root: str | Path, run_dir: str | Path, rank: int = 0,
                        world_size: int = 1) -> TrainingData:
    """The training split of the recipe's dataset as seeded batches for process ``rank`` of
    ``world_size``. ``config``: an ``ExperimentConfig``; ``run_dir`` holds the decoded-image cache
    when ``data.decoded_cache`` is ``run``. Bad settings raise ConfigError naming the recipe key."""
    table = training_table(config, Path(data_root))
    labels = label_space_for(table, config.data.attributes)
    batches = SeededBatches(build_sampler(config, table, labels, rank, world_size), config.seed, rank,
                            config.train.max_steps_per_epoch)
    steps_per_epoch = batches.steps_per_epoch()
    if steps_per_epoch == 0:
        raise ConfigError(f"data.sampler: p={config.data.sampler.p} × k={config.data.sampler.k} leaves no "
                          f"full batch per process for {len(table)} training images")
    cache = decoded_cache_for(config, Path(run_dir))
    size = tuple(config.data.image_size)
    # with the cache, images arrive decoded and resized: only the random part of the transform runs
    transform = (tensor_stage if cache is not None else default_transform)(size, config.data.augment)
    dataset = SeededDataset(ImageDataset(table, transform, labels, crop_bbox=config.data.crop_bbox, cache=cache))
    return TrainingData(table, labels, cache, batches, dataset, steps_per_epoch, config.seed)
