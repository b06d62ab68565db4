"""Batch samplers for metric learning: P groups × K images, reproducible and DDP-sharded.

Every process builds the same epoch plan from ``(seed, epoch)`` and keeps every
``world_size``-th batch starting at its ``rank``, so shards are disjoint and of equal length
(DDP needs the same number of steps on every process). Use one as a DataLoader's
``batch_sampler`` and call ``set_epoch`` before each epoch.

A recipe names its sampler (``data.sampler.kind``) in :data:`SAMPLERS`; each entry builds its
sampler from the training table, its label space and the recipe's ``data.sampler`` section
(``p``, ``k``, ``label``). A new sampler is a class and one registered function in this file.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..registry import Registry

SAMPLERS: Registry = Registry("sampler")
Batch = list  # list[int] or list[tuple[int, int]]


class _ShardedBatchSampler(Sampler[Batch]):
    def __init__(self, p: int, k: int, seed: int, rank: int, world_size: int):
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be positive, got p={p}, k={k}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.p, self.k, self.seed = p, k, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's plan; ``start`` skips this rank's first batches (mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def _num_planned(self) -> int:
        raise NotImplementedError

    def _plan(self, rng: np.random.Generator) -> list[Batch]:
        raise NotImplementedError

    def _shard_length(self) -> int:
        return self._num_planned() // self.world_size

    def __len__(self) -> int:
        return max(0, self._shard_length() - self.start)

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        plan = self._plan(rng)
        shard = plan[self.rank::self.world_size][: self._shard_length()]
        yield from shard[self.start:]


def _take(rng: np.random.Generator, pool: Sequence[int], count: int) -> list[int]:
    """``count`` members of ``pool``: distinct while the pool allows, each used before any repeats."""
    pool = np.asarray(pool)
    if len(pool) >= count:
        return rng.choice(pool, size=count, replace=False).tolist()
    extra = rng.choice(pool, size=count - len(pool), replace=True)
    return np.concatenate([rng.permutation(pool), extra]).tolist()


def _groups(labels: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(_as_list(labels)):
        if label is None or (isinstance(label, int) and label < 0):
            continue  # unknown label: such an image can be neither positive nor negative
        groups[label].append(index)
    return dict(groups)


def _groups_of_sets(value_sets: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Images of each value when an image may have several (an empty set: unknown)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, values in enumerate(value_sets):
        for value in dict.fromkeys(int(v) for v in values if int(v) >= 0):
            groups[value].append(index)
    return dict(groups)


def _as_list(values: Sequence[Hashable] | torch.Tensor | np.ndarray) -> list:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.tolist()
    return list(values)


class PKSampler(_ShardedBatchSampler):
    """P identities × K images per batch.

    An epoch is one pass over the identities or over the images, whichever takes more batches:
    ``max(G // P, N // (P·K))``. With many identities (items) each appears once per epoch. With few
    (the 10 categories of a category-level recipe) one pass over the identities would be a single
    batch, so identities come round again in reshuffled rounds (see ``_deal``).

    An identity with fewer than K images repeats some (single-image identities still count).
    Negative labels mean unknown and are never sampled.
    """

    def __init__(self, labels: Sequence[Hashable] | torch.Tensor, p: int, k: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(p, k, seed, rank, world_size)
        self.groups = list(_groups(labels).values())
        if len(self.groups) < p:
            raise ValueError(f"PKSampler needs at least p={p} identities, the labels have {len(self.groups)}")
        self.num_images = sum(len(group) for group in self.groups)

    def _num_planned(self) -> int:
        return max(len(self.groups) // self.p, self.num_images // self.batch_size)

    def _plan(self, rng: np.random.Generator) -> list[Batch]:
        order: list[int] = []
        batches = []
        for _ in range(self._num_planned()):
            chosen = _deal(rng, order, len(self.groups), self.p)
            batches.append([i for g in chosen for i in _take(rng, self.groups[g], self.k)])
        return batches


def _deal(rng: np.random.Generator, order: list[int], num_groups: int, count: int) -> list[int]:
    """The next ``count`` distinct groups from ``order`` (mutated), a round of shuffled groups.

    When the round runs out, a new shuffled round starts; the groups just dealt from the old one go
    to its end so a batch never holds a group twice. The first round is ``rng.permutation``, so an
    epoch that needs only one round is the same plan as shuffling the groups once.
    """
    dealt = order[:count]
    del order[:count]
    if len(dealt) < count:
        taken = set(dealt)
        fresh = rng.permutation(num_groups).tolist()
        need = count - len(dealt)
        fresh = [g for g in fresh if g not in taken] + [g for g in fresh if g in taken]
        dealt += fresh[:need]
        order[:] = fresh[need:]
    return dealt


class CrossDomainSampler(_ShardedBatchSampler):
    """P items per batch, each with K/2 consumer and K/2 shop images.

    Items without both a consumer and a shop image cannot form a cross-domain pair and are left out.
    As in ``PKSampler``, an epoch is one pass over the items or over their images, whichever takes
    more batches, so a category-level recipe (categories as items) gets more than one batch.
    """

    def __init__(self, item_ids: Sequence[Hashable], domains: Sequence[str], p: int, k: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, consumer: str = "consumer", shop: str = "shop"):
        super().__init__(p, k, seed, rank, world_size)
        if k % 2:
            raise ValueError(f"CrossDomainSampler needs an even k (half consumer, half shop), got {k}")
        items, domains = _as_list(item_ids), list(domains)
        if len(items) != len(domains):
            raise ValueError(f"{len(items)} item ids but {len(domains)} domains")
        by_item: dict[Hashable, dict[str, list[int]]] = defaultdict(lambda: {consumer: [], shop: []})
        for index, (item, domain) in enumerate(zip(items, domains)):
            if domain in (consumer, shop):
                by_item[item][domain].append(index)
        self.pairs = [(sides[consumer], sides[shop]) for sides in by_item.values() if sides[consumer] and sides[shop]]
        self.skipped_items = len(by_item) - len(self.pairs)
        if len(self.pairs) < p:
            raise ValueError(f"CrossDomainSampler needs at least p={p} items with both {consumer} and {shop} "
                             f"images, found {len(self.pairs)}")
        self.num_images = sum(len(c) + len(s) for c, s in self.pairs)

    def _num_planned(self) -> int:
        return max(len(self.pairs) // self.p, self.num_images // self.batch_size)

    def _plan(self, rng: np.random.Generator) -> list[Batch]:
        order: list[int] = []
        half = self.k // 2
        batches = []
        for _ in range(self._num_planned()):
            batch: list[int] = []
            for g in _deal(rng, order, len(self.pairs), self.p):
                consumer_images, shop_images = self.pairs[g]
                batch += _take(rng, consumer_images, half) + _take(rng, shop_images, half)
            batches.append(batch)
        return batches


class AttributeBatchSampler(_ShardedBatchSampler):
    """Each batch: one attribute, P of its values, K images per value, as (index, attribute) pairs.

    Attributes take turns (shuffled round robin) so each gets the same share of batches, and
    values are drawn uniformly so rare values are seen as often as common ones. An attribute
    with fewer than P values uses all of them with more images each, keeping P×K per batch.
    An epoch has N // (P×K) batches, about one pass over the images.

    ``multi_values`` (attribute index → each row's value ids) gives the attributes whose images
    may have several values (DeepFashion's types): an image is then in the group of each of its
    values, so it can be drawn for any of them. Two images of such a batch may share a value
    without having been drawn for the same one; the losses compare value sets
    (``attr_value_multi_hot``), not the drawn value, so they count them as positives.
    """

    def __init__(self, attr_labels: torch.Tensor | np.ndarray, p: int, k: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1,
                 multi_values: dict[int, Sequence[Sequence[int]]] | None = None):
        super().__init__(p, k, seed, rank, world_size)
        labels = np.asarray(attr_labels)
        if labels.ndim != 2:
            raise ValueError(f"attr_labels must be [N, A], got shape {tuple(labels.shape)}")
        self.num_images = labels.shape[0]
        multi_values = multi_values or {}
        for attribute, rows in multi_values.items():
            if not 0 <= attribute < labels.shape[1] or len(rows) != self.num_images:
                raise ValueError(f"multi_values[{attribute}] must give the value ids of each of the "
                                 f"{self.num_images} rows of one of the {labels.shape[1]} attributes")
        self.values: dict[int, list[list[int]]] = {}  # attribute -> images of each present value
        for attribute in range(labels.shape[1]):
            if attribute in multi_values:
                groups = list(_groups_of_sets(multi_values[attribute]).values())
            else:
                groups = list(_groups(labels[:, attribute].tolist()).values())
            if len(groups) >= 2:  # one value alone offers no negatives
                self.values[attribute] = groups
        if not self.values:
            raise ValueError("AttributeBatchSampler needs an attribute with at least two values present")
        if self.num_images < self.batch_size:
            raise ValueError(f"AttributeBatchSampler needs at least p*k={self.batch_size} images, got {self.num_images}")

    def _num_planned(self) -> int:
        return self.num_images // self.batch_size

    def _plan(self, rng: np.random.Generator) -> list[Batch]:
        attributes = list(self.values)
        turns: list[int] = []
        while len(turns) < self._num_planned():
            turns += rng.permutation(attributes).tolist()
        return [self._batch(rng, a) for a in turns[: self._num_planned()]]

    def _batch(self, rng: np.random.Generator, attribute: int) -> Batch:
        groups = self.values[attribute]
        chosen = rng.choice(len(groups), size=min(self.p, len(groups)), replace=False)
        base, extra = divmod(self.batch_size, len(chosen))
        batch: list[tuple[int, int]] = []
        for position, g in enumerate(chosen):
            count = base + (1 if position < extra else 0)
            batch += [(i, attribute) for i in _take(rng, groups[g], count)]
        return batch


# ---- by name: SAMPLERS.build(kind, table=..., labels=..., spec=..., seed=..., rank=..., world_size=...) ----
@SAMPLERS.register("pk")
def _pk(table, labels, spec, seed: int, rank: int, world_size: int) -> PKSampler:
    """P identities × K images; ``spec.label``: what a group shares (``item`` or ``category``)."""
    return PKSampler(labels.encode_table(table)[spec.label], spec.p, spec.k, seed, rank, world_size)


@SAMPLERS.register("cross_domain")
def _cross_domain(table, labels, spec, seed: int, rank: int, world_size: int) -> CrossDomainSampler:
    return CrossDomainSampler([s.item_id for s in table], [s.domain for s in table], spec.p, spec.k, seed, rank,
                              world_size)


@SAMPLERS.register("attribute")
def _attribute(table, labels, spec, seed: int, rank: int, world_size: int) -> AttributeBatchSampler:
    multi = {labels.attribute_index(name): labels.value_id_sets(table, name) for name in labels.multi_label}
    return AttributeBatchSampler(labels.encode_table(table)["attrs"], spec.p, spec.k, seed, rank, world_size,
                                 multi_values=multi)
