from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from fashion_retrieval.data.labels import LabelSpace
from fashion_retrieval.data.samplers import AttributeBatchSampler, CrossDomainSampler, PKSampler, _deal, _take
from fashion_retrieval.data.table import Sample, SampleTable


# ---- LabelSpace ----------------------------------------------------------------------

@pytest.fixture
def table() -> SampleTable:
    return SampleTable([
        Sample("1.jpg", "b", category="tee", attributes={"colour": "red", "style": ("sport", "casual")}),
        Sample("2.jpg", "a", category="dress", attributes={"colour": "blue"}),
        Sample("3.jpg", "a", attributes={"style": ("formal",)}),
    ], multi_label=["style"])


def test_ids_are_sorted_and_sizes_add_up(table):
    labels = LabelSpace.from_table(table)
    assert labels.items == ["a", "b"] and labels.categories == ["dress", "tee"]
    assert labels.attributes == {"colour": ["blue", "red"], "style": ["casual", "formal", "sport"]}
    assert labels.attribute_names == ["colour", "style"]
    assert labels.num_items == 2 and labels.num_values("style") == 3
    assert labels.attribute_sizes == [2, 3] and labels.total_attribute_values == 5
    assert labels.attribute_offsets == [0, 2]
    assert labels.multi_label == ("style",)


def test_encode_single_and_multi_label(table):
    labels = LabelSpace.from_table(table)
    first = labels.encode(table[0])
    assert first["item"] == 1 and first["category"] == 1
    assert first["attrs"].tolist() == [1, 0]  # red; lowest positive style id (casual)
    assert first["attr_multi_hot"].tolist() == [0, 1, 1, 0, 1]  # red | casual, sport
    third = labels.encode(table[2])
    assert third["category"] == -1 and third["attrs"].tolist() == [-1, 1]
    assert third["attr_multi_hot"].tolist() == [0, 0, 0, 1, 0]


def test_unseen_values_encode_as_missing(table):
    labels = LabelSpace.from_table(table)
    record = labels.encode(Sample("x.jpg", "never-seen", category="coat", attributes={"colour": "green"}))
    assert (record["item"], record["category"]) == (-1, -1)
    assert record["attrs"].tolist() == [-1, -1] and record["attr_multi_hot"].sum() == 0


def test_encode_table_matches_encode(table):
    labels = LabelSpace.from_table(table)
    encoded = labels.encode_table(table)
    for row, sample in enumerate(table):
        one = labels.encode(sample)
        assert encoded["item"][row] == one["item"] and encoded["category"][row] == one["category"]
        assert torch.equal(encoded["attrs"][row], one["attrs"])


def test_round_trip_through_json(table):
    labels = LabelSpace.from_table(table)
    restored = LabelSpace.from_dict(json.loads(json.dumps(labels.to_dict())))
    assert restored == labels
    assert torch.equal(restored.encode(table[0])["attr_multi_hot"], labels.encode(table[0])["attr_multi_hot"])


def test_bad_label_space_dicts_are_refused(table):
    data = LabelSpace.from_table(table).to_dict()
    with pytest.raises(ValueError, match="format version 99"):
        LabelSpace.from_dict({**data, "format_version": 99})
    with pytest.raises(ValueError, match="missing items"):
        LabelSpace.from_dict({k: v for k, v in data.items() if k != "items"})
    with pytest.raises(ValueError, match="duplicate item 'a'"):
        LabelSpace(items=["a", "a"], categories=[], attributes={})
    with pytest.raises(KeyError, match="unknown attribute 'size'"):
        LabelSpace.from_table(table).num_values("size")


# ---- PKSampler -----------------------------------------------------------------------

LABELS = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7]  # 8 identities, some with one image


def test_pk_batches_hold_p_identities_of_k_images():
    sampler = PKSampler(LABELS, p=3, k=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8 // 3
    for batch in batches:
        per_identity = Counter(LABELS[i] for i in batch)
        assert len(batch) == 6 and len(per_identity) == 3 and set(per_identity.values()) == {2}
    # an identity with >= K images never repeats one within its K
    for batch in batches:
        for label in {LABELS[i] for i in batch}:
            chosen = [i for i in batch if LABELS[i] == label]
            assert len(set(chosen)) == min(2, LABELS.count(label))


def test_pk_is_reproducible_and_changes_with_epoch():
    a, b = PKSampler(LABELS, 2, 4, seed=7), PKSampler(LABELS, 2, 4, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)


def test_pk_single_image_identities_are_used_and_unknown_labels_never():
    labels = [0, 1, 2, 3, -1, -1]
    batches = list(PKSampler(labels, p=4, k=3, seed=0))
    assert len(batches) == 1
    assert sorted(Counter(batches[0]).values()) == [3, 3, 3, 3]
    assert 4 not in batches[0] and 5 not in batches[0]


def test_pk_shards_are_disjoint_equal_and_cover_the_plan():
    full = list(PKSampler(LABELS, 1, 2, seed=3))
    shards = [list(PKSampler(LABELS, 1, 2, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [len(PKSampler(LABELS, 1, 2, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 8 // 3
    assert [b for shard in shards for b in shard] == [b for r in range(3) for b in full[r::3][: 8 // 3]]


def test_pk_resume_skips_consumed_batches():
    sampler = PKSampler(LABELS, 2, 2, seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=3)
    assert len(sampler) == len(whole) - 3 and list(sampler) == whole[3:]


def test_pk_with_few_identities_an_epoch_is_a_pass_over_the_images():
    # 3 categories as identities: one pass over the identities would be a single batch of 3 x 4.
    labels = [0] * 20 + [1] * 20 + [2] * 12 + [-1] * 5
    sampler = PKSampler(labels, p=3, k=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 52 // 12
    assert all(Counter(labels[i] for i in batch) == {0: 4, 1: 4, 2: 4} for batch in batches)
    assert all(len(set(batch)) == 12 for batch in batches)
    assert not any(i >= 52 for batch in batches for i in batch)


def test_deal_gives_distinct_groups_in_rounds():
    rng, order = np.random.default_rng(0), []
    dealt = [_deal(rng, order, 5, 3) for _ in range(10)]
    assert all(len(set(d)) == 3 for d in dealt)
    counts = Counter(g for d in dealt for g in d)
    assert set(counts) == set(range(5)) and max(counts.values()) - min(counts.values()) <= 1


def test_pk_with_many_identities_keeps_one_shuffle_per_epoch():
    # The plan of a one-round epoch is the plan of shuffling the identities once (as before rounds).
    sampler = PKSampler(LABELS, p=2, k=2, seed=5)
    rng = np.random.default_rng([5, 0])
    order = rng.permutation(len(sampler.groups))
    expected = [[i for g in order[b * 2:(b + 1) * 2] for i in _take(rng, sampler.groups[g], 2)] for b in range(4)]
    assert list(sampler) == expected


def test_pk_refuses_too_few_identities():
    with pytest.raises(ValueError, match="at least p=5 identities"):
        PKSampler([0, 1, 1], p=5, k=2)


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 12), min_size=4, max_size=80), p=st.integers(1, 4), k=st.integers(1, 4),
       world_size=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_pk_property_batches_are_valid(labels, p, k, world_size, seed):
    if len(set(labels)) < p:
        return
    for rank in range(world_size):
        sampler = PKSampler(labels, p, k, seed=seed, rank=rank, world_size=world_size)
        batches = list(sampler)
        assert len(batches) == len(sampler) == max(len(set(labels)) // p, len(labels) // (p * k)) // world_size
        for batch in batches:
            assert len(batch) == p * k
            assert all(0 <= i < len(labels) for i in batch)
            assert len({labels[i] for i in batch}) == p


# ---- CrossDomainSampler --------------------------------------------------------------

ITEMS = ["a", "a", "a", "b", "b", "c", "c", "d", "e", "e"]
DOMAINS = ["consumer", "shop", "shop", "consumer", "shop", "consumer", "consumer", "shop", "consumer", "shop"]


def test_cross_domain_batches_pair_consumer_and_shop_images():
    sampler = CrossDomainSampler(ITEMS, DOMAINS, p=3, k=4, seed=0)
    assert sampler.skipped_items == 2  # c has no shop image, d no consumer image
    batches = list(sampler)
    assert len(batches) == len(sampler) == 1
    batch = batches[0]
    assert len(batch) == 12
    for start in range(0, 12, 4):
        group = batch[start:start + 4]
        assert len({ITEMS[i] for i in group}) == 1 and ITEMS[group[0]] in {"a", "b", "e"}
        assert [DOMAINS[i] for i in group] == ["consumer", "consumer", "shop", "shop"]


def test_cross_domain_with_categories_as_items_an_epoch_covers_the_images():
    # 2 categories with 10 consumer + 14 shop photos each: one pass over the items is one batch.
    items = ["dress"] * 24 + ["hat"] * 24
    domains = (["consumer"] * 10 + ["shop"] * 14) * 2
    sampler = CrossDomainSampler(items, domains, p=2, k=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 48 // 8
    for batch in batches:
        assert [(items[i], domains[i]) for i in batch[:4]] in (
            [("dress", "consumer")] * 2 + [("dress", "shop")] * 2, [("hat", "consumer")] * 2 + [("hat", "shop")] * 2)
        assert {items[i] for i in batch} == {"dress", "hat"}


def test_cross_domain_needs_even_k_and_enough_items():
    with pytest.raises(ValueError, match="even k"):
        CrossDomainSampler(ITEMS, DOMAINS, p=1, k=3)
    with pytest.raises(ValueError, match="found 3"):
        CrossDomainSampler(ITEMS, DOMAINS, p=4, k=2)


# ---- AttributeBatchSampler -----------------------------------------------------------

ATTRS = torch.tensor([
    # colour (4 values), size (1 value only), style (2 values, some missing)
    [0, 0, 1], [0, 0, 0], [1, 0, -1], [1, 0, 1], [2, 0, 0], [2, 0, -1], [3, 0, 1], [3, 0, 0],
    [0, 0, 1], [1, 0, 0], [2, 0, 1], [3, 0, -1],
])


def test_attribute_batches_pick_one_attribute_and_p_values():
    sampler = AttributeBatchSampler(ATTRS, p=3, k=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12 // 6
    for batch in batches:
        assert len(batch) == 6
        attributes = {a for _, a in batch}
        assert len(attributes) == 1
        attribute = attributes.pop()
        assert attribute in (0, 2)  # "size" has a single value: no negatives, never chosen
        values = Counter(int(ATTRS[i, attribute]) for i, _ in batch)
        assert -1 not in values
        assert len(values) == min(3, {0: 4, 2: 2}[attribute])
        assert sum(values.values()) == 6


def test_attributes_take_turns():
    sampler = AttributeBatchSampler(ATTRS.repeat(10, 1), p=2, k=2, seed=0)
    chosen = Counter(batch[0][1] for batch in sampler)
    assert set(chosen) == {0, 2} and abs(chosen[0] - chosen[2]) <= 1


def test_attribute_sampler_feeds_tuple_indexed_datasets():
    class Echo(Dataset):
        def __len__(self):
            return len(ATTRS)

        def __getitem__(self, key):
            index, attribute = key
            return {"index": index, "attribute": attribute, "attr_value": int(ATTRS[index, attribute])}

    loader = DataLoader(Echo(), batch_sampler=AttributeBatchSampler(ATTRS, p=2, k=3, seed=5))
    for batch in loader:
        assert batch["attribute"].shape == (6,) and len(set(batch["attribute"].tolist())) == 1
        assert (batch["attr_value"] >= 0).all()


def test_attribute_sampler_refuses_unusable_labels():
    with pytest.raises(ValueError, match="at least two values"):
        AttributeBatchSampler(torch.zeros(10, 2, dtype=torch.long), p=2, k=2)
    with pytest.raises(ValueError, match=r"\[N, A\]"):
        AttributeBatchSampler(torch.zeros(10, dtype=torch.long), p=2, k=2)


def test_attribute_sampler_is_reproducible_and_sharded():
    plans = [list(AttributeBatchSampler(np.asarray(ATTRS.repeat(4, 1)), 2, 2, seed=9, rank=r, world_size=2))
             for r in range(2)]
    again = [list(AttributeBatchSampler(np.asarray(ATTRS.repeat(4, 1)), 2, 2, seed=9, rank=r, world_size=2))
             for r in range(2)]
    assert plans == again
    assert len(plans[0]) == len(plans[1]) == (48 // 4) // 2
    assert plans[0] != plans[1]
