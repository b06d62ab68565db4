"""Two-process DDP training on CPU (gloo) through torchrun: ranks stay in sync, shard the batches
and only rank 0 writes the run directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_train import TESTS, TINY_RECIPE, write_synthetic_viton

SCRIPT = """\
import hashlib, os, sys
from pathlib import Path
import yaml
from fashion_retrieval.config import config_from_dict
from fashion_retrieval.engine.train import train

recipe, data_root, out, report = sys.argv[1:5]
result = train(config_from_dict(yaml.safe_load(Path(recipe).read_text())), data_root, out)
digest = hashlib.sha256()
# Parameters only: BN running statistics are per rank until DDP broadcasts rank 0's at the next forward.
for name, tensor in sorted(result.model.named_parameters()):
    digest.update(name.encode()); digest.update(tensor.detach().cpu().numpy().tobytes())
Path(report, f"rank{os.environ['RANK']}.txt").write_text(f"{digest.hexdigest()} {result.steps}")
"""


def test_two_process_gloo_training(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    write_synthetic_viton(data_root / "viton", pairs=40, broken=())
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["train"].update({"epochs": 2, "max_steps_per_epoch": None, "checkpoint_every_steps": None})
    recipe_path, script = tmp_path / "recipe.yaml", tmp_path / "run_train.py"
    recipe_path.write_text(yaml.safe_dump(recipe))
    script.write_text(SCRIPT)
    report = tmp_path / "report"
    report.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
               str(script), str(recipe_path), str(data_root), str(tmp_path / "run"), str(report)]
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    digests = [(report / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert digests[0] == digests[1], "the ranks' weights diverged"
    # 40 pairs -> 28 train items -> 7 cross-domain batches of P=4 per epoch; each rank takes 3.
    assert digests[0][1] == str(2 * (7 // 2))
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file() and (run / "checkpoint-last").is_dir()
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)), "metrics.csv was written by more than one rank"
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"
