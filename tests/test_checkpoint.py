"""Inference checkpoints round-trip exactly and refuse what they cannot load; training
checkpoints are atomic (a failed write leaves the previous one loadable).

Also defines the tiny models that the engine tests train (registered in MODELS under test-only
names, so the engine is exercised through the registry exactly as with real models).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fashion_retrieval import atomic
from fashion_retrieval.engine import checkpoint as ckpt
from fashion_retrieval.engine.checkpoint import (CheckpointError, TrainingState, load_for_inference,
                                                 load_training_state, save_for_inference, save_training_state)
from fashion_retrieval.models import MODELS
from fashion_retrieval.provenance import git_commit


class TinyNet(nn.Module):
    """A few thousand parameters: conv → BN → pool → embedding, an ID head and dropout (so RNG matters)."""

    attribute_conditioned = False

    def __init__(self, num_items: int | None = None, attribute_sizes: list[int] | None = None,
                 feat_dim: int = 16, width: int = 8, dropout: float = 0.1, pretrained: bool = False):
        super().__init__()
        self.feat_dim = feat_dim
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(width, feat_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feat_dim, num_items) if num_items else None

    def forward(self, images: torch.Tensor, attribute: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        embedding = self.embed(self.body(images))
        outputs = {"embedding": embedding}
        if self.training:
            outputs["features"] = embedding
            if self.classifier is not None:
                outputs["logits"] = self.classifier(self.dropout(embedding))
        return outputs


class TinyAttributeNet(TinyNet):
    """Attribute-conditioned: a learned per-attribute channel mask on the embedding (ASEN in miniature)."""

    attribute_conditioned = True

    def __init__(self, attribute_sizes: list[int], num_items: int | None = None, feat_dim: int = 16, width: int = 8):
        super().__init__(num_items=None, feat_dim=feat_dim, width=width, dropout=0.0)
        self.masks = nn.Embedding(len(attribute_sizes), feat_dim)
        self.max_values = max(attribute_sizes)
        self.value_heads = nn.Parameter(torch.randn(len(attribute_sizes), self.max_values, feat_dim) * 0.1)
        self.register_buffer("sizes", torch.tensor(list(attribute_sizes)), persistent=False)

    def forward(self, images: torch.Tensor, attribute: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if attribute is None:
            raise ValueError("tiny_test_attribute_net needs attribute=")
        attribute = attribute.to(images.device)
        embedding = self.embed(self.body(images)) * torch.sigmoid(self.masks(attribute))
        outputs = {"embedding": embedding}
        if self.training:
            outputs["features"] = embedding
            logits = torch.einsum("bd,bvd->bv", embedding, self.value_heads[attribute])
            mask = torch.arange(self.max_values)[None, :] < self.sizes[attribute][:, None]
            outputs["attr_value_logits"] = logits.masked_fill(~mask, -1e4)
            outputs["attr_value_mask"] = mask
        return outputs


for _name, _cls in (("tiny_test_net", TinyNet), ("tiny_test_attribute_net", TinyAttributeNet)):
    if _name not in MODELS:
        MODELS.register(_name)(_cls)


def _tiny(run_dir: Path, **kwargs) -> tuple[nn.Module, dict]:
    kwargs = {"num_items": 5, "feat_dim": 16, **kwargs}
    torch.manual_seed(0)
    model = MODELS.build("tiny_test_net", **kwargs)
    meta = {"model": {"name": "tiny_test_net", "kwargs": kwargs}, "image_size": [64, 48]}
    save_for_inference(model, meta, run_dir)
    return model, meta


def test_inference_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, _ = _tiny(tmp_path / "run")
    images = torch.rand(3, 3, 64, 48)
    expected = model.eval()(images)["embedding"]
    for path in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded, meta = load_for_inference(path)
        assert not loaded.training
        assert torch.equal(loaded(images)["embedding"], expected)
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert meta["feat_dim"] == 16 and meta["image_size"] == [64, 48]
    assert meta["model"] == {"name": "tiny_test_net", "kwargs": {"num_items": 5, "feat_dim": 16}}
    assert not list((tmp_path / "run").glob(".*tmp*")), "temporary files left behind"


def test_attribute_conditioned_round_trip(tmp_path: Path) -> None:
    kwargs = {"attribute_sizes": [3, 4]}
    model = MODELS.build("tiny_test_attribute_net", **kwargs)
    save_for_inference(model, {"model": {"name": "tiny_test_attribute_net", "kwargs": kwargs}}, tmp_path)
    loaded, meta = load_for_inference(tmp_path)
    images, attribute = torch.rand(2, 3, 32, 24), torch.tensor([0, 1])
    assert torch.equal(loaded(images, attribute)["embedding"], model.eval()(images, attribute)["embedding"])
    assert meta["attribute_conditioned"] is True


def test_refuses_other_model_and_version(tmp_path: Path) -> None:
    _tiny(tmp_path)
    with pytest.raises(CheckpointError, match="expected 'asen'"):
        load_for_inference(tmp_path, expected_model="asen")

    meta_path = tmp_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    # A meta.json describing another architecture than the weights were saved from.
    meta["model"]["kwargs"]["feat_dim"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.safetensors: weights do not fit"):
        load_for_inference(tmp_path)

    meta["model"]["kwargs"]["feat_dim"] = 16
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta.json: checkpoint format version 99"):
        load_for_inference(tmp_path)


def test_refuses_missing_corrupt_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_for_inference(tmp_path / "nowhere")
    _tiny(tmp_path / "a")
    (tmp_path / "a" / "meta.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"a/meta.json:1: corrupt JSON"):
        load_for_inference(tmp_path / "a")

    _tiny(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match=r"b/model.safetensors: not a readable safetensors"):
        load_for_inference(tmp_path / "b")

    _tiny(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"c/model.safetensors: file not found"):
        load_for_inference(tmp_path / "c")

    # Weights from one save with the meta.json of another (a crash between the two renames).
    _tiny(tmp_path / "d")
    old_meta = (tmp_path / "d" / "meta.json").read_text()
    _tiny(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text(old_meta)
    with pytest.raises(CheckpointError, match="different saves"):
        load_for_inference(tmp_path / "d")


def _state(epoch: int) -> TrainingState:
    return TrainingState(epoch=epoch, step=10 * epoch, optimizer={"lr": 0.1}, rng=ckpt.capture_rng_states())


def test_training_state_round_trip_and_rng(tmp_path: Path) -> None:
    model = TinyNet(num_items=3)
    torch.manual_seed(123)
    save_training_state(tmp_path, model, _state(2))
    expected = torch.rand(4)
    other = TinyNet(num_items=3)
    torch.manual_seed(999)
    state = load_training_state(tmp_path, other)
    ckpt.restore_rng_states(state.rng)
    assert torch.equal(torch.rand(4), expected)
    assert state.epoch == 2 and state.step == 20 and state.optimizer == {"lr": 0.1}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_failed_training_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyNet(num_items=3)
    save_training_state(tmp_path, model, _state(1))
    first_weights = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def disk_full(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)  # part of the file is written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(CheckpointError, match=r"checkpoint-last/training_state.pt: could not write the training checkpoint \(No space left on device\); "
                                                  "the previous checkpoint is unchanged"):
        save_training_state(tmp_path, model, _state(2))
    monkeypatch.undo()

    restored = TinyNet(num_items=3)
    state = load_training_state(tmp_path, restored)
    assert state.epoch == 1
    for key, value in restored.state_dict().items():
        assert torch.equal(value, first_weights[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last"], "temporary directory left behind"


def test_failed_inference_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _tiny(tmp_path)
    images = torch.rand(2, 3, 32, 24)
    expected = model.eval()(images)["embedding"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_file", disk_full)
    with pytest.raises(CheckpointError, match=r"model.safetensors: could not write the model \(No space left on "
                                              r"device\); the previous model is unchanged"):
        _tiny(tmp_path, feat_dim=8)
    monkeypatch.undo()
    loaded, meta = load_for_inference(tmp_path)
    assert meta["feat_dim"] == 16
    assert torch.equal(loaded(images)["embedding"], expected)


def test_interrupted_swap_falls_back_to_previous(tmp_path: Path) -> None:
    model = TinyNet(num_items=3)
    save_training_state(tmp_path, model, _state(1))
    # The state between "move the old one aside" and "move the new one in".
    (tmp_path / ckpt.TRAINING_DIR).rename(tmp_path / ckpt.PREVIOUS_TRAINING_DIR)
    assert load_training_state(tmp_path, TinyNet(num_items=3)).epoch == 1
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_training_state(tmp_path / "empty", model)


def test_git_commit_marks_uncommitted_source_changes(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "code.py").write_text("x = 1\n")
    (repo / "notes.txt").write_text("notes\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert git_commit(repo / "src") == head
    (repo / "notes.txt").write_text("other notes\n")  # outside src/ and configs/: not the run's code
    (repo / "src" / "new_untracked.py").write_text("")
    assert git_commit(repo) == head
    (repo / "src" / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == head + "+dirty"
    (tmp_path / "not_a_checkout").mkdir()
    assert git_commit(tmp_path / "not_a_checkout") is None


RUN_BEFORE_ENGINE_SPLIT = Path(__file__).resolve().parent / "fixtures" / "run-main-54a499c"


def test_a_run_written_before_the_engine_split_loads_and_resumes(tmp_path: Path) -> None:
    """A run directory written by main's code at 54a499c (see the fixture's README)."""
    import shutil

    from test_train import write_synthetic_viton

    from fashion_retrieval.config import load_config
    from fashion_retrieval.engine.train import train

    run = tmp_path / "run"
    shutil.copytree(RUN_BEFORE_ENGINE_SPLIT, run)
    model, meta = load_for_inference(run)
    assert meta["epoch"] == 2 and meta["feat_dim"] == 16 and meta["model"]["kwargs"]["num_items"] == 42
    assert model(torch.rand(2, 3, 64, 48))["embedding"].shape == (2, 16)
    state = load_training_state(run, TinyNet(num_items=42, feat_dim=16))
    assert (state.epoch, state.step, state.step_in_epoch) == (2, 6, 0)

    write_synthetic_viton(tmp_path / "data" / "viton")
    messages: list[str] = []
    result = train(load_config(run / "config.yaml", ["train.epochs=3"]), tmp_path / "data", run, resume=True,
                   log=messages.append)
    assert any(m.startswith(f"resuming {run} at epoch 3, step 6") for m in messages), messages
    assert (result.epochs, result.steps) == (3, 9)
    _, meta = load_for_inference(run)
    assert meta["epoch"] == 3 and meta["step"] == 9
    assert load_training_state(run, TinyNet(num_items=42, feat_dim=16)).epoch == 3
