"""Data-parallel replicas behind SGLang's model gateway (smg), as one OpenAI-compatible endpoint.

    python -m dynsplit_sglang.serve_dp --replicas 2 --port 30000 -- \\
        --model-path M --kv dynsplit --kv-budget 2048 [any other sglang.launch_server flag]

Starts N `sglang.launch_server` replicas with the flags after `--` on ports port+1 .. port+N
(`{replica}` in a flag becomes the replica's index, e.g. a trace file each), all with the same
`--served-model-name` (default "default"), so the gateway sees one model. On a CPU each replica
is pinned to its share of the cores (and as many OpenMP threads); with GPUs each gets one
(CUDA_VISIBLE_DEVICES). Once they answer, `smg launch` serves on `--port` with cache-aware
routing: a request goes to the replica whose radix tree (as the gateway approximates it) holds
the longest prefix of it, so the turns of a conversation, and conversations that share a system
prompt, land where their KV and split blocks already are. Ctrl-C or SIGTERM stops everything.

Gateway defaults chosen for cache affinity (override with `--gateway-args`): the gateway's
stalled-worker detection waits 600 s instead of 3 (a CPU replica's long prefill emits no token
for seconds), and its warm-up diversion (every 8th cache hit sent to an idle replica) and
overload protection (diverting at 80% KV use) are off, since a compressing replica's pool use
says little about its room. Logs: one file per replica and one for the gateway in `--log-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

GATEWAY_DEFAULTS = (
    "--policy",
    "cache_aware",
    "--worker-wedge-secs",
    "600",
    "--worker-warmup-secs",
    "0",
    "--worker-warmup-divert-every",
    "0",
    "--disable-worker-overload-protection",
    "--worker-startup-check-interval",
    "1",
    "--disable-tokenizer-autoload",
)


def core_shares(cores: list[int], replicas: int) -> list[list[int]]:
    """The cores split into `replicas` contiguous shares, as even as they go."""
    if replicas > len(cores):
        raise SystemExit(f"--replicas {replicas}: only {len(cores)} CPU cores to pin them to")
    size, extra = divmod(len(cores), replicas)
    shares, at = [], 0
    for i in range(replicas):
        n = size + (i < extra)
        shares.append(cores[at : at + n])
        at += n
    return shares


def _uses_gpu(server_args: list[str]) -> bool:
    if "--device" in server_args and server_args[server_args.index("--device") + 1] == "cpu":
        return False
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


def replica_commands(server_args: list[str], replicas: int, host: str, port: int) -> list[list[str]]:
    """The launch command of each replica (its {replica} placeholders filled in)."""
    named = "--served-model-name" in server_args
    return [
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            *(a.replace("{replica}", str(i)) for a in server_args),
            "--host",
            host,
            "--port",
            str(port + 1 + i),
            *(() if named else ("--served-model-name", "default")),
        ]
        for i in range(replicas)
    ]


def gateway_command(replica_urls: list[str], host: str, port: int, metrics_port: int, extra: list[str]) -> list[str]:
    smg = shutil.which("smg", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if smg is None:
        raise SystemExit("the gateway needs SGLang's model gateway: pip install 'dynsplit-sglang[gateway]' (smg)")
    return [
        smg,
        "launch",
        "--host",
        host,
        "--port",
        str(port),
        "--worker-urls",
        *replica_urls,
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(metrics_port),
        *GATEWAY_DEFAULTS,
        *extra,
    ]


def gateway_ready(url: str, replicas: int) -> bool:
    """Whether the gateway at `url` routes to all its replicas: its /readiness says ready as soon
    as one is healthy, and a load sent then would pin every conversation to that one."""
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(url + "/readiness", timeout=5) as r:
            return r.status == 200 and json.loads(r.read()).get("healthy_workers") == replicas
    return False


def wait_until(ready, proc: subprocess.Popen, what: str, timeout: float, hint=lambda: "") -> None:
    """Until ready() is true. RuntimeError naming `what` if its process exits first, TimeoutError
    when the time runs out; hint() is appended (e.g. where its log is)."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{hint()}")
        if ready():
            return
        if time.time() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s{hint()}")
        time.sleep(1)


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    return False


def _start(cmd: list[str], log: str, env: dict, cores: list[int] | None) -> subprocess.Popen:
    """Start a replica or the gateway in its own process group, its output in `log`; in the child
    before exec: its CPU cores, and SIGKILL when the launcher dies (Linux), so a killed launcher
    leaves no replica or gateway behind."""

    def setup() -> None:
        if cores is not None:
            os.sched_setaffinity(0, cores)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    with open(log, "w") as out:  # the child keeps its own copy of the file
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=setup
        )


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m dynsplit_sglang.serve_dp [options] -- --model-path M [server flags]")
    ours, server_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="the gateway's; replicas take the next ones")
    p.add_argument(
        "--metrics-port", type=int, default=None, help="the gateway's Prometheus port (default: after the replicas')"
    )
    p.add_argument("--log-dir", default="serve_dp_logs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each replica")
    p.add_argument("--gateway-args", default="", help="more `smg launch` flags, e.g. '--policy round_robin'")
    args = p.parse_args(ours)
    if args.replicas < 1:
        raise SystemExit(f"--replicas must be at least 1, got {args.replicas}")
    for flag in ("--host", "--port"):
        if flag in server_args:
            raise SystemExit(f"{flag} after --: the replicas' ports and host are set by serve_dp (--port {args.port})")
    os.makedirs(args.log_dir, exist_ok=True)

    gpu = _uses_gpu(server_args)
    shares = None if gpu else core_shares(sorted(os.sched_getaffinity(0)), args.replicas)
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        urls, logs = [], []
        for i, cmd in enumerate(replica_commands(server_args, args.replicas, args.host, args.port)):
            env = dict(os.environ)
            if gpu:
                env["CUDA_VISIBLE_DEVICES"] = str(i)
            else:
                env["OMP_NUM_THREADS"] = str(len(shares[i]))
            log = os.path.join(args.log_dir, f"replica-{i}.log")
            procs.append(_start(cmd, log, env, None if gpu else shares[i]))
            logs.append(log)
            where = f"GPU {i}" if gpu else f"cores {','.join(map(str, shares[i]))}"
            print(f"replica {i}: {shlex.join(cmd)}  [{where}, log {log}]", flush=True)
            urls.append(f"http://{args.host}:{args.port + 1 + i}")
        for i, (url, proc, log) in enumerate(zip(urls, procs, logs)):
            wait_until(
                lambda u=url: answers(u + "/health"),
                proc,
                f"replica {i}",
                args.timeout,
                lambda g=log: f"; its log: {g}",
            )
        metrics_port = args.metrics_port or args.port + args.replicas + 1
        cmd = gateway_command(urls, args.host, args.port, metrics_port, shlex.split(args.gateway_args))
        log = os.path.join(args.log_dir, "gateway.log")
        procs.append(_start(cmd, log, dict(os.environ), None))
        print(f"gateway: {shlex.join(cmd)}  [log {log}]", flush=True)
        gateway = f"http://{args.host}:{args.port}"
        wait_until(
            lambda: gateway_ready(gateway, args.replicas), procs[-1], "the gateway", 120, lambda: f"; its log: {log}"
        )
        print(f"ready: http://{args.host}:{args.port} ({args.replicas} replicas, cache-aware routing)", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        raise SystemExit(f"{'the gateway' if dead[0] == len(procs) - 1 else f'replica {dead[0]}'} exited; stopping")
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as error:
        raise SystemExit(str(error)) from None
    finally:
        _stop(procs)


if __name__ == "__main__":
    main()
