"""scripts/make_results.py: tables from evaluation JSON, the hand-written analysis placed under them."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(path: Path, benchmark: str, experiment: str, top1: float) -> None:
    path.write_text(json.dumps({
        "benchmark": benchmark, "kind": "instance", "split": "test", "metric_names": ["top1", "mAP"],
        "metrics": {"overall": {"top1": top1, "mAP": top1 / 2, "queries": 10}},
        "experiment": experiment, "command": f"fashion-retrieval train --config {experiment}.yaml",
        "hardware": {"cpu": "test cpu", "torch": "x", "cpu_threads": 2},
        "git_commit": {"model_c": "0123456789abcdef0123456789abcdef01234567",
                       "model_b": "89abcdef0123456789abcdef0123456789abcdef+dirty"}.get(experiment),
    }))


def test_tables_rows_and_analysis_sections(tmp_path, capsys):
    make_results = _load_script()
    _result(tmp_path / "a.json", "bench_one", "model_b", 0.5)
    _result(tmp_path / "b.json", "bench_one", "model_a", 0.25)
    _result(tmp_path / "c.json", "bench_two", "model_c", 1.0)
    (tmp_path / "long").mkdir()
    _result(tmp_path / "long" / "d.json", "bench_one", "model_a", 0.75)  # another budget: its own table
    (tmp_path / "analysis.md").write_text(
        "Preamble words.\n\n## bench_two\nTwo is read so.\n\n## bench_one\nOne is read so.\n\n## bench_gone\nOrphan.\n")
    out = tmp_path / "docs" / "results.md"
    assert make_results.main([str(tmp_path / "**" / "*.json"), "--out", str(out),
                              "--analysis", str(tmp_path / "analysis.md")]) == 0
    text = out.read_text()
    assert "| model_a [1] | 25.00 | 12.50 | 10 |" in text and "| model_b [2] | 50.00 | 25.00 | 10 |" in text
    assert "`fashion-retrieval train --config model_c.yaml` — test cpu, torch x, 2 CPU threads — commit `0123456`\n" in text
    assert ("`fashion-retrieval train --config model_b.yaml` — test cpu, torch x, 2 CPU threads — commit `89abcde` "
            "with uncommitted changes\n") in text
    assert "`fashion-retrieval train --config model_a.yaml` — test cpu, torch x, 2 CPU threads\n" in text
    assert text.count("## bench_one\n") == 1 and text.count("### test split") == 3
    assert "| model_a [1] | 75.00 | 37.50 | 10 |" in text
    order = [text.index(s) for s in ("Preamble words.", "## bench_one", "| model_a [1] | 25.00",
                                     "| model_a [1] | 75.00", "One is read so.", "## bench_two", "Two is read so.")]
    assert order == sorted(order)
    assert "Orphan." not in text and "bench_gone" in capsys.readouterr().err


def test_learning_curves_from_metrics_csv_beside_the_json(tmp_path):
    make_results = _load_script()
    folder = tmp_path / "converged"
    folder.mkdir()
    _result(folder / "model_a.json", "bench_one", "model_a", 0.5)
    _result(folder / "model_b.json", "bench_one", "model_b", 0.25)  # no curve file: a row without a line
    (folder / "model_a.metrics.csv").write_text(
        "step,epoch,train.loss,eval.val.overall/mAP\n10,1,2.0,\n10,1,,0.125\n20,2,1.5,\n20,2,,0.25\n")
    assert make_results.read_curve(folder / "model_a.metrics.csv", "eval.val.overall/mAP") == [(1, 0.125), (2, 0.25)]
    out = tmp_path / "docs" / "results.md"
    assert make_results.main([str(folder / "*.json"), "--out", str(out), "--analysis", str(tmp_path / "none.md")]) == 0
    images = list((tmp_path / "docs" / "img").glob("curves_bench_one_*.png"))
    assert len(images) == 1 and images[0].stat().st_size > 1000
    assert f"](img/{images[0].name})" in out.read_text()
