"""A disk that fills up under `train`, `index build` and `index add`, for real: the commands run
in a child process whose files may not grow past a few kilobytes (RLIMIT_FSIZE), so its writes
fail with an OSError exactly where a full disk fails them. Each must stop with one line naming
what it could not write, leave the previous checkpoint or index loadable, and leave no
temporary files behind. The server's writes fail by an injected ENOSPC (it runs in-process).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from catalog_fixtures import jpeg_bytes, photo_like, write_catalog
from test_checkpoint import _tiny
from test_index_cli import assert_one_line_error, search_json
from test_serve import assert_error, upload
from test_train import _env, _recipe, write_synthetic_viton

from fashion_retrieval.cli import app
from fashion_retrieval.config import config_from_dict
from fashion_retrieval.engine.checkpoint import load_for_inference, load_training_state
from fashion_retrieval.engine.train import train
from fashion_retrieval.index.build import build_index
from fashion_retrieval.index.catalog import CatalogIndex
from fashion_retrieval.serve.app import create_app
from fashion_retrieval.serve.embedders import TorchEmbedder

resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs a POSIX system")

# the test models are registered by importing test_checkpoint, in the child as in this process
CLI = [sys.executable, "-c", "import test_checkpoint; from fashion_retrieval.cli import app; app()"]


def run_with_file_size_limit(limit: int, *args) -> SimpleNamespace:
    """The CLI in a child process whose files cannot grow past ``limit`` bytes; the result has
    the attributes of a CliRunner result, so the one-line-error assertion applies to it."""
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=_env(), timeout=300,
                          preexec_fn=limit_file_size)
    return SimpleNamespace(exit_code=done.returncode, stderr=done.stderr, output=done.stdout + done.stderr)


def temporary_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".old")]


def test_training_that_cannot_write_its_checkpoint_keeps_the_previous_one(tmp_path):
    data_root = tmp_path / "data"
    write_synthetic_viton(data_root / "viton", pairs=20, broken=())
    short = {"train__max_steps_per_epoch": 2, "train__checkpoint_every_steps": None}
    one_epoch, two_epochs = _recipe(tmp_path, train__epochs=1, **short), _recipe(tmp_path, train__epochs=2, **short)
    run = tmp_path / "run"
    train(config_from_dict(yaml.safe_load(one_epoch.read_text())), data_root, run, log=lambda _: None)

    # the tiny model's files are a few kilobytes: a 3 kB limit fails the next checkpoint's writes
    full = run_with_file_size_limit(3000, "train", "--config", two_epochs, "--data-root", data_root, "--out", run,
                                    "--resume")
    assert_one_line_error(full, str(run), "could not write", "File too large", "unchanged")
    assert not temporary_leftovers(run)
    model, meta = load_for_inference(run)
    assert meta["epoch"] == 1 and load_training_state(run, model).epoch == 1

    # with space again the run continues from the checkpoint the failure left in place
    resumed = train(config_from_dict(yaml.safe_load(two_epochs.read_text())), data_root, run, resume=True,
                    log=lambda _: None)
    assert resumed.epochs == 2 and load_for_inference(run)[1]["epoch"] == 2


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: int):
    """A real filesystem of ``size`` bytes at ``folder`` (root in a container can mount one);
    the test is skipped where mounting is not allowed. Always unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


PAGE = 4096  # tmpfs counts whole pages


def pages(folder: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_a_full_disk_during_a_training_checkpoint_names_the_file_and_keeps_the_previous_one(tmp_path, how,
                                                                                             monkeypatch):
    """ENOSPC, the real full disk: on a tmpfs barely larger than the run (or, where none can be
    mounted, an ENOSPC injected into the training state's write after part of it is written)."""
    data_root = tmp_path / "data"
    write_synthetic_viton(data_root / "viton", pairs=20, broken=())
    # a checkpoint after every step: the first write of the resumed epoch that needs space is one
    short = {"train__max_steps_per_epoch": 2, "train__checkpoint_every_steps": 1, "data__decoded_cache": "off"}
    one_epoch, two_epochs = _recipe(tmp_path, train__epochs=1, **short), _recipe(tmp_path, train__epochs=2, **short)
    first = tmp_path / "first"
    train(config_from_dict(yaml.safe_load(one_epoch.read_text())), data_root, first, log=lambda _: None)
    resume = ["train", "--config", str(two_epochs), "--data-root", str(data_root), "--resume"]

    def check_and_continue(run: Path, result) -> None:
        assert_one_line_error(result, f"{run / 'checkpoint-last'}/", "could not write the training checkpoint",
                              "No space left on device", "the previous checkpoint is unchanged")
        assert not temporary_leftovers(run)
        model, meta = load_for_inference(run)
        assert meta["epoch"] == 1 and load_training_state(run, model).epoch == 1
        monkeypatch.undo()
        again = tmp_path / "again"  # with space again the run continues from that checkpoint
        shutil.copytree(run, again)
        resumed = train(config_from_dict(yaml.safe_load(two_epochs.read_text())), data_root, again, resume=True,
                        log=lambda _: None)
        assert resumed.epochs == 2 and load_for_inference(again)[1]["epoch"] == 2

    if how == "injected":
        import torch

        real_save = torch.save

        def disk_full(obj, handle, *args, **kwargs):
            real_save(obj, handle, *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", disk_full)
        check_and_continue(first, CliRunner().invoke(app, [*resume, "--out", str(first)]))
        return
    # room for the small files a resume rewrites first (recipe, metrics log, TensorBoard events)
    # and the new weights, not for the new training state beside the old one
    weights = -(-(first / "checkpoint-last" / "model.safetensors").stat().st_size // PAGE)
    state = -(-(first / "checkpoint-last" / "training_state.pt").stat().st_size // PAGE)
    assert state > 4, "the training state must need more room than the slack"
    with small_tmpfs(tmp_path / "small", (pages(first) + 3 + weights + 1) * PAGE) as small:
        run = small / "run"
        shutil.copytree(first, run)
        result = CliRunner().invoke(app, [*resume, "--out", str(run)])
        check_and_continue(run, result)


def test_an_index_that_cannot_be_written_keeps_answering_from_the_previous_one(tmp_path):
    checkpoint = tmp_path / "run"
    _tiny(checkpoint)
    photos = write_catalog(tmp_path / "catalog", 120)
    index = tmp_path / "index"
    built = CliRunner().invoke(app, ["index", "build", "--checkpoint", str(checkpoint), "--images",
                                     str(tmp_path / "catalog"), "--out", str(index)])
    assert built.exit_code == 0, built.output
    # 12 kB: the model copy and the vectors fit, the metadata of 120 images does not
    limit = 12_000
    assert (checkpoint / "model.safetensors").stat().st_size < limit
    assert (index / "spaces" / "default" / "base-000001.jsonl").stat().st_size > limit

    rebuild = run_with_file_size_limit(limit, "index", "build", "--checkpoint", checkpoint,
                                       "--images", tmp_path / "catalog", "--out", index)
    assert_one_line_error(rebuild, f"{index}: could not write the index (File too large); "
                                   "the previous index is unchanged")
    add = run_with_file_size_limit(limit, "index", "add", "--index", index, "--images", tmp_path / "catalog")
    assert_one_line_error(add, f"{index}: could not write the index (File too large)")

    assert len(CatalogIndex.open(index)) == 120
    assert search_json(index, photos[7])[0]["id"] == photos[7].stem
    assert not temporary_leftovers(tmp_path)


def test_a_server_that_cannot_save_an_added_item_answers_503_and_forgets_it(tmp_path, monkeypatch):
    import fashion_retrieval.index.faiss_store as faiss_store

    checkpoint = tmp_path / "run"
    _tiny(checkpoint)
    photos = write_catalog(tmp_path / "catalog", 6)
    build_index(checkpoint, tmp_path / "catalog", tmp_path / "index", progress=False)
    client = TestClient(create_app(tmp_path / "index", TorchEmbedder(tmp_path / "index" / "model"),
                                   allow_writes_without_key=True), base_url="http://127.0.0.1")
    new_photo = jpeg_bytes(photo_like(500))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss_store, "write_file_synced", disk_full)
    assert_error(client.post("/items", files=upload(new_photo), data={"item_id": "new"}), 503,
                 "could not save the index: No space left on device")
    assert_error(client.delete(f"/items/{photos[0].stem}"), 503, "No space left on device")
    # what the server answers is what is on disk: the refused item is not found, the item it
    # could not delete still is
    found = [r["id"] for r in client.post("/search", params={"k": 10}, files=upload(new_photo)).json()["results"]]
    assert "new" not in found and photos[0].stem in found and len(found) == 6
    assert client.get("/health").json()["items"] == len(CatalogIndex.open(tmp_path / "index")) == 6

    monkeypatch.undo()  # space again: the next write succeeds and carries only its own change
    assert client.post("/items", files=upload(new_photo), data={"item_id": "other"}).status_code == 201
    saved = CatalogIndex.open(tmp_path / "index")
    assert len(saved) == 7 and "other" in saved.stores["default"] and "new" not in saved.stores["default"]


def test_the_recipe_copy_and_the_metrics_log_name_their_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """The writes besides the checkpoints: each names its file (a full disk's OSError names none)
    and leaves no temporary file."""
    import builtins

    from fashion_retrieval import atomic
    from fashion_retrieval.engine import metrics_log
    from fashion_retrieval.config import dump_config

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config = config_from_dict(yaml.safe_load(_recipe(tmp_path).read_text()))
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError) as info:
        dump_config(config, tmp_path / "config.yaml")
    assert info.value.filename == str(tmp_path / "config.yaml") and "No space left" in info.value.strerror
    monkeypatch.undo()

    log = metrics_log.MetricsLog(tmp_path, enabled=True, resume_step=None)
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.4})

    def full_when(modes: str):
        def opener(file, mode="r", *args, **kwargs):
            return disk_full() if any(m in mode for m in modes) else builtins.open(file, mode, *args, **kwargs)
        return opener

    # the same columns are appended; a new column (the first eval row) rewrites the file
    for row, modes in (({"step": 3, "loss": 0.3}, "a"), ({"step": 4, "loss": 0.2, "eval.x": 1.0}, "w")):
        # an appended row is written by the log itself, a rewrite through the atomic module
        for module in (metrics_log, atomic):
            monkeypatch.setattr(module, "open", full_when(modes), raising=False)
        with pytest.raises(OSError) as info:
            log.log(row)
        assert info.value.filename == str(tmp_path / "metrics.csv"), info.value
        assert "could not write the metrics log (No space left on device)" in info.value.strerror
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file() and p.suffix != ".yaml") == ["metrics.csv"]
