"""Starting `python -m sglang.launch_server` on loopback for the tests and benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from dynsplit_sglang.serve_dp import answers, gateway_ready, wait_until
from dynsplit_sglang.testing import process_setup

# The CPU recipe: fp32 (bf16 matmuls are slow on CPUs without AMX) and a small KV pool.
CPU_ARGS = ("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "20000")


def cpu_args(pool_tokens: int) -> list[str]:
    """The CPU recipe with a KV pool of this many tokens."""
    args = list(CPU_ARGS)
    args[args.index("--max-total-tokens") + 1] = str(pool_tokens)
    return args


def flush_cache(url: str, wait_s: float = 120) -> None:
    """Empty the server's radix cache once it is idle: SGLang refuses a flush while a request
    runs (and aborts a dropped stream only ~2 s after its client left)."""
    deadline = time.time() + wait_s
    while True:
        request = urllib.request.Request(url + "/flush_cache?timeout=30", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60):
                return
        except urllib.error.HTTPError as e:
            if time.time() > deadline:
                raise RuntimeError(f"the cache never flushed: {e.code} {e.read().decode(errors='replace')}") from None
        time.sleep(1)


def scrape_metrics(url: str) -> dict[str, dict[str, float]]:
    """The server's SGLang metrics (/metrics, --enable-metrics): name -> the kv_policy label of
    each series ("" without one) -> its value, summed over the other labels."""
    found: dict[str, dict[str, float]] = {}
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        m = re.match(r"^(sglang:\w+)(?:\{(.*)\})? (\S+)$", line)
        if m:
            policy = re.search(r'kv_policy="([^"]*)"', m.group(2) or "")
            series = found.setdefault(m.group(1), {})
            label = policy.group(1) if policy else ""
            series[label] = series.get(label, 0.0) + float(m.group(3))
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies (Linux), so a
    killed pytest leaves no server behind (and the server's processes follow theirs)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports (serve_dp's gateway, replicas, metrics)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


@contextlib.contextmanager
def start_dp(model_path: str, replicas: int, *args: str, log_dir: str, device_args=CPU_ARGS, timeout: float = 600):
    """`python -m dynsplit_sglang.serve_dp`: replicas of a CPU server behind SGLang's gateway.
    yields (the gateway's URL, the replicas' URLs); stops them all after."""
    port = free_port_run(replicas + 2)
    cmd = [
        sys.executable,
        "-m",
        "dynsplit_sglang.serve_dp",
        "--replicas",
        str(replicas),
        "--port",
        str(port),
        "--log-dir",
        log_dir,
        "--",
        "--model-path",
        model_path,
        *device_args,
        "--skip-server-warmup",
        *args,
    ]
    out = open(os.path.join(log_dir, "serve_dp.log"), "w")
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: gateway_ready(url, replicas), proc, "serve_dp", timeout, lambda: _tail(out.name))
        yield url, [f"http://127.0.0.1:{port + 1 + i}" for i in range(replicas)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # the launcher stops its replicas and the gateway
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()


def _tail(log_path: str | None, lines: int = 20) -> str:
    if not log_path:
        return ""
    with open(log_path, errors="replace") as f:
        return "\n" + "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def launch_server(model_path: str, *args: str, **kwargs):
    """Start a CPU server with the given extra flags; yields its base URL; stops it after."""
    with start_server(model_path, *args, **kwargs) as (url, _):
        yield url


@contextlib.contextmanager
def start_server(
    model_path: str,
    *args: str,
    device_args: Sequence[str] = CPU_ARGS,
    timeout: float = 300,
    log_path: str | None = None,
):
    """Start a server with the given extra flags (on the CPU unless device_args says otherwise);
    yields (base URL, the launcher's Popen, which leads the server's process group); stops it after."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *device_args,
        "--skip-server-warmup",
        *args,
    ]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    # The launcher dies with this process, and every process of the server with its parent, from
    # its first line (SGLang's own subprocesses arm that only after their imports).
    env = dict(os.environ, PYTHONPATH=process_setup.pythonpath_with(process_setup.die_with_parent_folder()))
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: answers(url + "/health"), proc, f"server ({' '.join(cmd)})", timeout, lambda: _tail(log_path)
        )
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log_path:
            log.close()
