"""A real Milvus server process for the store tests, started from what the package registry ships.

First choice: the ``milvus`` package (milvus-io's embedded Milvus: the standalone server binary,
2.3.x, started as a child process with its own etcd and local storage). Fallback: milvus-lite's
own gRPC server (``python -m milvus_lite server``), which speaks the same protocol over TCP.
Neither installed: the tests that need a server are skipped, and the milvus-lite file store is
still tested.
"""
from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

SERVER_SCRIPT = """
import sys, time
from milvus import MilvusServer
server = MilvusServer()
server.set_base_dir(sys.argv[1])
server.listen_port = int(sys.argv[2])
server.start()
print("ready", flush=True)
try:
    sys.stdin.read()  # the test closes stdin to stop us
finally:
    server.stop()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Milvus server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"no Milvus server listening on {port} after {timeout:.0f} s")


@contextlib.contextmanager
def milvus_server(folder: Path) -> Iterator[tuple[str, str]]:
    """(uri, which server) of a server running until the context exits."""
    port = free_port()
    if importlib.util.find_spec("milvus") is not None:
        command = [sys.executable, "-c", SERVER_SCRIPT, str(folder), str(port)]
        which = "milvus (embedded Milvus standalone)"
    elif importlib.util.find_spec("milvus_lite") is not None:
        command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(folder), "--host", "127.0.0.1",
                   "--port", str(port)]
        which = "milvus-lite gRPC server"
    else:
        raise ModuleNotFoundError("neither milvus nor milvus-lite is installed")
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, 120)
        yield f"http://127.0.0.1:{port}", which
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()  # the embedded server stops its child processes
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
