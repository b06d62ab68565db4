"""End-to-end training speed: a real recipe on real photos through `fashion-retrieval train`,
JPEG decoding, augmentation, DataLoader workers and checkpoints included, at this checkout and
(optionally) at an older commit, so an engine change is measured where it counts.

Each variant is ``NAME=[@GIT_REF] [key=value ...]``: the recipe's overrides for that row, run
from a temporary worktree at ``GIT_REF`` when one is given (that commit's own engine and
defaults; keys it does not know fail there). Every variant trains the same epochs × steps; the
table gives images/s of the first epoch (cold: every image decoded, the decoded-image cache
filled) and of the later ones (warm), from the run's metrics.csv (one row per epoch), and the
wall time of the whole command.

    python benchmarks/train_e2e.py --data-root ../shared/data \\
        --variant "before=@7a917e4" --variant "now=" --variant "now-no-cache=data.decoded_cache=off"

Run it with the cores free: the numbers are throughput on a shared 2-core machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The CPU budget of the VITON rows of docs/results.md (scripts/results_cpu.sh).
VITON_BUDGET = ["data.image_size=[96,72]", "data.sampler.p=16", "data.sampler.k=2",
                "model.kwargs.backbone=efficientnet_lite0", "model.kwargs.pretrained=true"]


def parse_variant(text: str) -> tuple[str, str | None, list[str]]:
    name, _, rest = text.partition("=")
    words = rest.split()
    ref = words.pop(0)[1:] if words and words[0].startswith("@") else None
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=[@REF] [key=value ...]")
    return name, ref, words


def worktree_at(ref: str, parent: Path) -> Path:
    folder = parent / f"worktree-{ref}"
    if not folder.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref], check=True,
                       capture_output=True)
    return folder


def epoch_throughput(metrics_csv: Path) -> list[float]:
    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("images_per_s")]
    return [float(row["images_per_s"]) for row in rows]


def run_training(source: Path, recipe: str | Path, data_root: str | Path, out: Path, overrides: list[str],
                 log: Path) -> dict:
    """``fashion-retrieval train`` of ``source``'s engine in a child process, its output in ``log``.

    Returns ``returncode``, ``output``, ``seconds`` (wall time of the whole command, evaluation
    included) and ``peak_rss_mib``. Shared with speedup_equivalence.py."""
    command = [sys.executable, "-m", "fashion_retrieval", "train", "--config", str(source / recipe),
               "--data-root", str(Path(data_root).resolve()), "--out", str(out), *overrides]
    env = {**os.environ, "PYTHONPATH": str(source / "src")}
    started = time.perf_counter()
    with open(log, "w+", encoding="utf-8") as handle:
        process = subprocess.Popen(command, cwd=source, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
        # wait4, not wait: its rusage is the process's own peak RSS and that of the loader workers it reaped
        _, status, usage = os.wait4(process.pid, 0)
        handle.seek(0)
        output = handle.read()
    return {"returncode": os.waitstatus_to_exitcode(status), "output": output,
            "seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def last_line(run: dict) -> str:
    """What a failed run said last (its error), for a table row."""
    return (run["output"].strip().splitlines() or ["exit status %d" % run["returncode"]])[-1]


def run_variant(args: argparse.Namespace, name: str, ref: str | None, overrides: list[str], scratch: Path) -> dict:
    source = worktree_at(ref, scratch) if ref else REPO
    out = scratch / f"run-{name}"
    run = run_training(source, args.recipe, args.data_root, out,
                       [f"name=e2e-{name}", f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps}",
                        f"train.log_every={args.steps}", "train.eval_every=0", "train.progress=false",
                        "eval.benchmark=null", f"seed={args.seed}", *VITON_BUDGET, *args.set, *overrides],
                       scratch / f"log-{name}.txt")
    row = {"variant": name, "ref": ref or "checkout", "overrides": overrides, "seconds": run["seconds"],
           "peak_rss_mib": run["peak_rss_mib"]}
    if run["returncode"] != 0:
        row["error"] = last_line(run)
        return row
    per_epoch = epoch_throughput(out / "metrics.csv")
    row.update(epoch_img_s=per_epoch, first_epoch_img_s=per_epoch[0] if per_epoch else None,
               later_img_s=round(sum(per_epoch[1:]) / len(per_epoch[1:]), 1) if len(per_epoch) > 1 else None,
               # every epoch trains the same images: the whole run's rate is the harmonic mean
               run_img_s=round(len(per_epoch) / sum(1 / value for value in per_epoch), 1) if per_epoch else None,
               log=[line for line in run["output"].splitlines() if line.startswith(("execution on", "decoded-image"))])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/viton_global_ce.yaml", help="relative to the repository")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME=[@GIT_REF] [key=value ...] (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="an override for every variant")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="train-e2e-") as tmp:
        scratch = Path(tmp)
        rows = []
        try:
            for name, ref, overrides in args.variant:
                rows.append(run_variant(args, name, ref, overrides, scratch))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            for folder in scratch.glob("worktree-*"):
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)],
                               capture_output=True)
    base = next((row for row in rows if "error" not in row), None)
    print(f"{'variant':<16} {'ref':<10} {'epoch 1 img/s':>14} {'later img/s':>12} {'ratio':>6} "
          f"{'peak RSS MiB':>13} {'wall s':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<16} {row['ref']:<10} failed: {row['error']}")
            continue
        # whole training runs against the first variant, cold first epoch included
        ratio = row["run_img_s"] / base["run_img_s"]
        print(f"{row['variant']:<16} {row['ref']:<10} {row['first_epoch_img_s'] or 0:>14.1f} "
              f"{row['later_img_s'] or 0:>12.1f} {ratio:>6.2f} {row['peak_rss_mib']:>13.1f} {row['seconds']:>8.1f}")
    size = [item.split("=", 1)[1] for item in [*VITON_BUDGET, *args.set] if item.startswith("data.image_size=")][-1]
    print(f"{args.recipe}, {args.epochs} epochs x {args.steps} steps, batch 32 at {size}; ratio = images/s over all "
          f"epochs against the first variant's; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
