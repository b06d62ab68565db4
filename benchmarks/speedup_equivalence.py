"""Numerical equivalence of the CPU speed-ups: does a short seed-fixed training run with them
(channels_last, the decoded-image cache, optionally torch.compile) end at the same metric as
the same run without them, within the noise that the seed alone makes?

Every row is a real ``fashion-retrieval train`` of one recipe (by default the attribute
classifier on the fashion-product photos at 80×60, 2 epochs × 30 steps of batch 32, evaluated
once at the end on the validation split), in its own child process:

- ``off``: every speed-up off (``train.channels_last=false``, ``train.compile=false``,
  ``train.amp=false``, ``data.decoded_cache=off``), for several seeds: their spread is the seed
  noise (seed changes the initial weights, the batch plan and the augmentation);
- ``on``: the engine's CPU defaults (channels_last on, decoded-image cache in the run directory,
  bf16 autocast off on the CPU, ``compile: auto``, which stays eager in a run this short;
  ``--compile`` forces ``train.compile=true``), for some of the same seeds;
- ``cache-only``: speed-ups off but the cache on. The cache gives bit-identical batches
  (tests/test_image_cache.py) and CPU training is deterministic, so this row must reproduce
  ``off`` of its seed to the last digit: any difference is a bug, not noise.

The verdict compares |on − off| of each seed with the spread of ``off`` across seeds (its
range and sample standard deviation; with three seeds a crude estimate, said as such).

    nice -n 10 .venv/bin/python benchmarks/speedup_equivalence.py --data-root ../shared/data \\
        --json runs/speedup_equivalence.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_e2e import REPO, epoch_throughput, last_line, run_training  # noqa: E402

SPEEDUPS_OFF = ["train.channels_last=false", "train.compile=false", "train.amp=false", "data.decoded_cache=off"]
SPEEDUPS_ON = ["train.channels_last=true", "data.decoded_cache=run"]  # amp and compile: the engine's auto
CACHE_ONLY = ["train.channels_last=false", "train.compile=false", "train.amp=false", "data.decoded_cache=run"]
# A short run of the attribute classifier that still learns something measurable: batch 32,
# 80×60 (about the photos' own size), one loader worker in every row, the validation split.
SHORT_RUN = ["data.image_size=[80,60]", "data.sampler.p=8", "data.sampler.k=4", "data.num_workers=1",
             "eval.final_split=val"]


def planned_rows(off_seeds: list[int], on_seeds: list[int], cache_only_seeds: list[int],
                 compile_on: bool) -> list[tuple[str, int, list[str]]]:
    """(row, seed, overrides), alternating off and on of the same seed so that a change of
    machine load during the benchmark touches both alike."""
    on = SPEEDUPS_ON + (["train.compile=true"] if compile_on else [])
    rows = []
    for seed in dict.fromkeys(off_seeds + on_seeds + cache_only_seeds):
        rows += [("off", seed, SPEEDUPS_OFF)] if seed in off_seeds else []
        rows += [("on", seed, on)] if seed in on_seeds else []
        rows += [("cache-only", seed, CACHE_ONLY)] if seed in cache_only_seeds else []
    return rows


def verdict(rows: list[dict]) -> dict:
    """Seed noise of the ``off`` rows and |row − off| of the same seed for every other row, in
    the metric's own unit. ``within_noise``: every |on − off| at most the off rows' range;
    ``cache_identical``: every cache-only row equal to its off row exactly."""
    good = [row for row in rows if row.get("metric") is not None]
    off = {row["seed"]: row["metric"] for row in good if row["row"] == "off"}
    values = list(off.values())
    noise = {"seeds": sorted(off), "range": max(values) - min(values) if len(values) > 1 else None,
             "std": statistics.stdev(values) if len(values) > 1 else None}
    differences = {name: {row["seed"]: abs(row["metric"] - off[row["seed"]])
                          for row in good if row["row"] == name and row["seed"] in off}
                   for name in ("on", "cache-only")}
    on = list(differences["on"].values())
    return {"noise": noise, "differences": differences,
            "within_noise": bool(on) and noise["range"] is not None and max(on) <= noise["range"],
            "cache_identical": all(value == 0.0 for value in differences["cache-only"].values())
            if differences["cache-only"] else None}


def run_row(args: argparse.Namespace, name: str, seed: int, overrides: list[str], scratch: Path) -> dict:
    from fashion_retrieval.engine.stopping import metric_value

    out = scratch / f"run-{name}-{seed}"
    run = run_training(REPO, args.recipe, args.data_root, out,
                       [f"name=equivalence-{name}-{seed}", f"seed={seed}", f"train.epochs={args.epochs}",
                        f"train.max_steps_per_epoch={args.steps}", f"train.log_every={args.steps}",
                        "train.eval_every=0", "train.progress=false", *SHORT_RUN, *args.set, *overrides],
                       scratch / f"log-{name}-{seed}.txt")
    row = {"row": name, "seed": seed, "overrides": overrides, "seconds": run["seconds"]}
    if run["returncode"] != 0:
        row["error"] = last_line(run)
        return row
    evaluation = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    row.update(metric=metric_value(evaluation["metrics"], args.metric), split=evaluation["split"],
               metrics=evaluation["metrics"].get("overall"),
               img_s=epoch_throughput(out / "metrics.csv"),
               log=[line for line in run["output"].splitlines()
                    if line.startswith(("execution on", "decoded-image", "compiling", "torch.compile"))])
    if row["metric"] is None:
        row["error"] = f"{args.metric} is not among the evaluation's metrics"
    return row


def points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/fashion_product_attribute_classifier.yaml",
                        help="relative to the repository")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--metric", default="overall/MAP@all", help="a path into eval.json's metrics")
    parser.add_argument("--epochs", type=int, default=2, help="2: the second epoch reads the decoded-image cache")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--off-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--on-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cache-only-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--compile", action="store_true", help="force train.compile=true in the 'on' rows")
    parser.add_argument("--set", action="append", default=[], help="an override for every row")
    parser.add_argument("--json", help="write the rows and the verdict here")
    args = parser.parse_args()
    if len(args.off_seeds) < 2:
        parser.error("--off-seeds: at least two seeds, or there is no seed noise to compare with")

    rows = []
    with tempfile.TemporaryDirectory(prefix="speedup-equivalence-") as tmp:
        for name, seed, overrides in planned_rows(args.off_seeds, args.on_seeds, args.cache_only_seeds, args.compile):
            rows.append(run_row(args, name, seed, overrides, Path(tmp)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "metrics"}), file=sys.stderr, flush=True)
    result = verdict(rows)

    print(f"{'row':<11} {'seed':>4} {args.metric + ' %':>16} {'img/s per epoch':>18} {'wall s':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['row']:<11} {row['seed']:>4} failed: {row['error']}")
            continue
        rates = " / ".join(f"{rate:.1f}" for rate in row["img_s"])
        print(f"{row['row']:<11} {row['seed']:>4} {points(row['metric']):>16} {rates:>18} {row['seconds']:>8.1f}")
    noise = result["noise"]
    print(f"seed noise of 'off' (seeds {', '.join(map(str, noise['seeds']))}): range {points(noise['range'])} points, "
          f"sample std {points(noise['std'])} points")
    for name in ("on", "cache-only"):
        for seed, difference in result["differences"][name].items():
            print(f"|{name} - off|, seed {seed}: {points(difference)} points"
                  + (f" ({difference / noise['range']:.2f} of the seed range)" if noise["range"] else ""))
    if result["cache_identical"] is not None:
        print("cache-only reproduces off exactly" if result["cache_identical"]
              else "cache-only DIFFERS from off of the same seed: the cache or determinism is broken")
    print(f"verdict: speed-ups {'within' if result['within_noise'] else 'NOT within'} the seed noise "
          f"(every |on - off| at most the range across seeds); {args.recipe}, {args.epochs} epochs x {args.steps} "
          f"steps, {' '.join(SHORT_RUN + args.set)}; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "verdict": result},
                                              indent=2))


if __name__ == "__main__":
    main()
