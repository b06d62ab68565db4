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


def _speedup_equivalence():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speedup_equivalence
    finally:
        sys.path.remove(str(BENCHMARKS))
    return speedup_equivalence


def test_speedup_equivalence_verdict_compares_same_seed_differences_with_the_seed_spread() -> None:
    bench = _speedup_equivalence()
    rows = [{"row": "off", "seed": 0, "metric": 0.40}, {"row": "on", "seed": 0, "metric": 0.43},
            {"row": "cache-only", "seed": 0, "metric": 0.40}, {"row": "off", "seed": 1, "metric": 0.45},
            {"row": "on", "seed": 1, "metric": 0.44}, {"row": "off", "seed": 2, "metric": 0.35},
            {"row": "on", "seed": 2, "error": "boom"}]
    result = bench.verdict(rows)
    assert result["noise"]["seeds"] == [0, 1, 2]
    assert abs(result["noise"]["range"] - 0.10) < 1e-12 and abs(result["noise"]["std"] - 0.05) < 1e-12
    assert {seed: round(d, 12) for seed, d in result["differences"]["on"].items()} == {0: 0.03, 1: 0.01}
    assert result["within_noise"] and result["cache_identical"]

    rows[1]["metric"] = 0.51  # |on - off| = 0.11 > the seed range 0.10
    rows[2]["metric"] = 0.40000001  # the cache must reproduce its seed exactly, not nearly
    result = bench.verdict(rows)
    assert not result["within_noise"] and result["cache_identical"] is False


def test_speedup_equivalence_rows_alternate_off_and_on_per_seed() -> None:
    bench = _speedup_equivalence()
    plan = bench.planned_rows([0, 1, 2], [0, 1], [0], compile_on=True)
    assert [(name, seed) for name, seed, _ in plan] == [("off", 0), ("on", 0), ("cache-only", 0), ("off", 1),
                                                        ("on", 1), ("off", 2)]
    overrides = {name: set(words) for name, _, words in plan}
    assert {"train.channels_last=false", "train.compile=false", "data.decoded_cache=off"} <= overrides["off"]
    assert {"train.channels_last=true", "data.decoded_cache=run", "train.compile=true"} <= overrides["on"]
    assert overrides["cache-only"] == (overrides["off"] - {"data.decoded_cache=off"}) | {"data.decoded_cache=run"}


def test_topk_kernels_prints_every_kernel() -> None:
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "topk_kernels.py"), "--queries", "64", "--gallery",
                                "2048", "--dim", "32", "--k", "10", "--repeat", "1"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    timings = [line.rsplit(maxsplit=1) for line in completed.stdout.splitlines()[1:]]
    assert len(timings) == 10 and all(float(seconds) >= 0 for _, seconds in timings)
    assert any(name.startswith("FAISS knn") for name, _ in timings)
