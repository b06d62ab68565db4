"""How an evaluation's metrics move when the gallery is smaller: the prediction for a test set drawn
like the benchmark's but with fewer gallery items (docs/results.md, "Smaller galleries").

    .venv/bin/python scripts/gallery_size_curve.py runs/eval/clothing.npz --sizes 250,500,1000,2000 --draws 20

The .npz is the one `fashion-retrieval evaluate --json X.json` writes beside X.json. Each size is
the mean (± standard deviation) over random gallery subsets of that size; queries whose relevant
items all fell out are not evaluated (engine.evaluate.smaller_gallery_metrics).
"""
from __future__ import annotations

import argparse

from fashion_retrieval.engine.evaluate import load_npz, metric_names, smaller_gallery_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("npz", help="the evaluation's saved embeddings (written beside its JSON)")
    parser.add_argument("--sizes", required=True, help="comma-separated gallery sizes; the full size is added")
    parser.add_argument("--draws", type=int, default=20, help="random subsets per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    saved = load_npz(args.npz)
    full = len(next(iter(saved["gallery_labels"].values())))
    sizes = sorted({int(size) for size in args.sizes.split(",")} | {full})
    names = metric_names(saved["kind"])
    curve = smaller_gallery_metrics(args.npz, sizes, draws=args.draws, seed=args.seed)
    print(f"| gallery | draws | queries | {' | '.join(names)} |")
    print("|---:|---:|---:|" + "---:|" * len(names))
    for row in curve:
        cells = [f"{100 * row['mean'][n]:.2f} ± {100 * row['std'][n]:.2f}" if row["draws"] > 1
                 else f"{100 * row['mean'][n]:.2f}" for n in names]
        print(f"| {row['gallery']} | {row['draws']} | {row['mean']['queries']:.0f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
