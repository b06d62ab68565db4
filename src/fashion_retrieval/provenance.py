"""Where a result came from: the code's commit, the hardware, the command that ran, the time.

Recorded in every checkpoint's meta.json (``git_commit``) and every evaluation JSON and
benchmark table (:func:`provenance`, :func:`hardware_description`), so a number can be traced to
what produced it. torch is imported only by :func:`hardware_description`.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def git_commit(where: str | Path | None = None) -> str | None:
    """The source checkout's commit, recorded so a result can be traced to its code; ``+dirty``
    is appended when tracked files under ``src/`` or ``configs/`` differ from it (the commit alone
    would then not reproduce the run). ``where``: a folder of the checkout (default: this package's)."""
    folder = Path(where) if where is not None else Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        top = git("rev-parse", "--show-toplevel").stdout.strip()
        changed = git("-C", top, "diff", "--quiet", "HEAD", "--", "src", "configs") if top else None
        return head.stdout.strip() + ("+dirty" if changed is not None and changed.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware_description(device: Any = "cpu") -> dict[str, Any]:
    """Device, platform, Python and torch versions, CPU threads and model, GPU name on CUDA."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    cpu = cpu_model()
    if cpu:
        info["cpu"] = cpu
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def invoking_command() -> str:
    """The command line that is running, as a user would type it."""
    program = Path(sys.argv[0]).name
    if program in ("fashion-retrieval", "__main__.py"):
        return " ".join(["fashion-retrieval", *sys.argv[1:]])
    return " ".join(sys.argv)


def provenance(device: Any, meta: Any) -> dict[str, Any]:
    """How a result was made: command, hardware, code version and time. ``meta``: the
    checkpoint's meta (a ``RunMeta`` or its dict), whose package version and commit are the model's."""
    get = meta.get if isinstance(meta, dict) else lambda key: getattr(meta, key, None)
    return {
        "command": invoking_command(),
        "hardware": hardware_description(device),
        "package_version": get("package_version"),
        "git_commit": get("git_commit"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
