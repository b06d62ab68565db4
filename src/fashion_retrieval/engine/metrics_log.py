"""A run's ``metrics.csv`` and TensorBoard events, one row per log step or evaluation."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from .. import atomic

METRICS_FILE = "metrics.csv"


class MetricsLog:
    """metrics.csv + TensorBoard, rank 0 only. On resume, rows after the checkpoint are dropped
    (the killed run logged steps that the resumed run repeats)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        else:
            self.path.unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is optional at run time; the CSV is the record
            self.writer = None
        self._rewrite()

    def _rewrite(self) -> None:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        try:
            with atomic.replacing(self.path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns or ["step"])
                writer.writeheader()
                writer.writerows(self.rows)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> OSError:
        # a failed write (a full disk) names no file by itself; the checkpoints are separate files
        return OSError(exc.errno, f"could not write the metrics log ({exc.strerror or exc}); the last "
                                  "checkpoint is unchanged", str(self.path))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        known = list(self.rows[0]) if self.rows else []
        self.rows.append(row)
        if known and list(row) == known:
            try:  # a row in the known columns is appended; a crash can cost only that row
                with open(self.path, "a", newline="", encoding="utf-8") as handle:
                    csv.DictWriter(handle, fieldnames=known).writerow(row)
            except OSError as exc:
                raise self._write_error(exc) from exc
        else:
            self._rewrite()  # new columns (e.g. the first eval row): rewrite with the wider header
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace(".", "/", 1), value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flatten_numbers(prefix: str, data: Any, out: dict[str, float]) -> dict[str, float]:
    """``{"overall": {"mAP": 0.5}}`` → ``{"overall/mAP": 0.5}``: an evaluation's numbers as columns."""
    if isinstance(data, dict):
        for key, value in data.items():
            flatten_numbers(f"{prefix}/{key}" if prefix else str(key), value, out)
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix] = float(data)
    return out
