"""The throughput benchmarks run end to end at a tiny size and write the rows they promise."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, json_path: Path) -> dict:
    completed = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(json_path)],
                               capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(json_path.read_text())
    assert report["hardware"]["device"] == "cpu" and report["command"].startswith(f"benchmarks/{script}")
    return report


def test_train_throughput_rows(tmp_path: Path) -> None:
    report = _run("train_throughput.py", "--device", "cpu", "--backbone", "resnet18", "--reference", "resnet18",
                  "--batch", "8", "--size", "32", "32", "--steps", "1", "--warmup", "1", "--threads", "1",
                  "--same-process", "--set", "mmfl_net:model.kwargs.fusion_channels=64",
                  json_path=tmp_path / "train.json")
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["reference", "global_net", "mmfl_net", "m3_net"]
    for row in rows.values():
        assert "error" not in row and row["images_per_s"] > 0 and row["peak_memory_gb"] > 0
        assert row["forward_gmacs"] > 0
    assert rows["mmfl_net"]["overrides"] == ["model.kwargs.fusion_channels=64"] and not rows["global_net"]["overrides"]
    # every project row trains with its recipe's loss terms and optimizer
    assert rows["global_net"]["loss_terms"] == ["cross_entropy", "trihard"]
    assert rows["mmfl_net"]["loss_terms"] == ["cross_entropy", "improved_trihard", "trihard_branches", "center"]
    assert rows["m3_net"]["loss_terms"] == ["attribute_triplet", "cluster_triplet", "attribute_bce"]
    assert rows["m3_net"]["optimizer"] == "adam" and rows["reference"]["optimizer"] == "sgd"
    assert report["settings"]["batch"] == 8 and report["settings"]["size"] == [32, 32]


def test_embed_throughput_rows(tmp_path: Path) -> None:
    report = _run("embed_throughput.py", "--device", "cpu", "--backbone", "resnet18", "--n", "20", "--batch", "8",
                  "--size", "32", "32", "--workers", "1", "--threads", "1", "--generate", "--decoders", "pil,device",
                  "--forward-steps", "2", "--warmup", "1", json_path=tmp_path / "embed.json")
    rows = {row["path"]: row for row in report["rows"]}
    assert list(rows) == ["forward", "loader (pil)", "e2e (pil)", "e2e (device)"]
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert rows["e2e (pil)"]["images"] == rows["e2e (device)"]["images"] == 20  # every generated file embedded
    assert report["settings"]["source"].startswith("generated")
