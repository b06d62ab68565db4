"""Embedding (skips bad images, normalised, same result in batch or one by one) and evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_jpeg, write_truncated_jpeg
from test_checkpoint import TinyAttributeNet, TinyNet

from fashion_retrieval.data.table import Sample, SampleTable
from fashion_retrieval.engine.embed import embed_images, embed_table, embed_table_attributes


def _table(root: Path, count: int = 7, broken: tuple[int, ...] = (2,)) -> SampleTable:
    samples = []
    for i in range(count):
        path = root / f"img{i}.jpg"
        if i in broken:
            write_truncated_jpeg(path)
        else:
            write_jpeg(path, size=(30, 40), color=(30 * i % 256, 200 - 20 * i, 90))
        samples.append(Sample(path=path.name, item_id=str(i)))
    samples.append(Sample(path="missing.jpg", item_id="missing"))
    return SampleTable(samples, root=root)


def test_embed_table_skips_bad_images_and_matches_embed_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet(num_items=3)
    model.train()  # embedding must switch to eval (BN statistics, no dropout) and back
    table = _table(tmp_path)
    result = embed_table(model, table, (64, 48), batch_size=3, progress=False)
    assert model.training
    assert result.indices.tolist() == [0, 1, 3, 4, 5, 6]
    assert result.embeddings.shape == (6, 16) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, rtol=1e-5)
    assert len(result.skipped) == 2
    assert any("missing.jpg" in s for s in result.skipped) and any("img2.jpg" in s for s in result.skipped)

    one_by_one = embed_images(model, [Image.open(tmp_path / f"img{i}.jpg") for i in result.indices], (64, 48))
    np.testing.assert_allclose(one_by_one, result.embeddings, atol=1e-5)


def test_embed_attribute_conditioned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyAttributeNet(attribute_sizes=[2, 3])
    table = _table(tmp_path, count=4, broken=())
    both = embed_table_attributes(model, table, (32, 24), attributes=[0, 1], progress=False)
    for attribute in (0, 1):
        single = embed_table(model, table, (32, 24), attribute=attribute, progress=False)
        np.testing.assert_allclose(both.by_attribute[attribute], single.embeddings, atol=1e-6)
    assert not np.allclose(both.by_attribute[0], both.by_attribute[1])
    with pytest.raises(ValueError, match="attribute-conditioned"):
        embed_table(model, table, (32, 24), progress=False)
