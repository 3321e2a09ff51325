"""Starting in-process SGLang engines on CPU for the tests, and reading the dynsplit trace."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import signal

from tests import subprocess_failures as failures

# Prose, code, records and questions: every kind of delimiter the policies care about.
SAMPLE_TEXT = (
    "def area(radius):\n    return 3.14159 * radius ** 2\n\n"
    "The committee met on Tuesday; its members argued, voted, and adjourned. "
    "Records: {id: 17, name: 'Ada', role: 'admin'}, {id: 18, name: 'Lin', role: 'user'}.\n"
    "Why does the river bend? Because water follows the softest ground! "
    "In short, the plan works (mostly), though costs rose by 12% in the third quarter.\n"
)

CPU_ENGINE = dict(
    device="cpu",
    dtype="float32",  # exact comparisons; bf16 matmuls are also far slower on CPUs without AMX
    max_total_tokens=16384,
    skip_server_warmup=True,
    disable_overlap_schedule=True,
    log_level="error",
)


@contextlib.contextmanager
def engine(model_path, **kwargs):
    """An in-process engine for one test; it and every subprocess it started are gone after, and
    so are its asyncio tasks, sockets and at-exit shutdown. A failing subprocess fails the test
    (SubprocessFailed), not the run (subprocess_failures.py). SIGTERM stays the test run's."""
    import sglang as sgl

    args = {**CPU_ENGINE, "custom_sigquit_handler": failures.raise_on_sigquit, **kwargs}
    if args.get("kv") in (None, "full"):
        args.setdefault("attention_backend", "torch_native")
    previous = {s: signal.getsignal(s) for s in (signal.SIGQUIT, signal.SIGTERM)}
    before = failures.child_pids()
    try:
        eng = sgl.Engine(model_path=model_path, **args)
    except BaseException as error:
        failures.kill_new_children(before)
        failures.close_sockets(failures.frame_locals(error))
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    failures.stop_loop_on_sigquit(eng)
    _keep_sigterm(eng, previous[signal.SIGTERM])
    tasks_before = asyncio.all_tasks(eng.loop)
    try:
        yield eng
    except BaseException as error:
        eng.shutdown()
        if failures.failed(eng):
            raise failures.SubprocessFailed(failures.MESSAGE) from error
        raise
    else:
        eng.shutdown()
    finally:
        # Shut down here, so not again at exit: SGLang registers every engine's shutdown with
        # atexit, which would then log into pytest's closed capture stream and keep the engine alive.
        atexit.unregister(eng.shutdown)
        failures.release(eng.tokenizer_manager, asyncio.all_tasks(eng.loop) - tasks_before)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _keep_sigterm(eng, handler) -> None:
    """SGLang's TokenizerManager takes SIGTERM for its event loop at the first request (a graceful
    drain), and the loop hears it only while it runs: a terminated test run would go on. Start
    that loop's tasks now (from inside the loop, as a request would) and give SIGTERM back to the
    run's handler (tests/conftest.py)."""

    async def start_loop():
        eng.tokenizer_manager.auto_create_handle_loop()

    eng.loop.run_until_complete(start_loop())
    eng.loop.remove_signal_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, handler)


def generate(eng, prompts, max_new_tokens=12, custom_params=None):
    """Greedy generation; returns (output token ids, meta_info) per prompt."""
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    if custom_params:
        params["custom_params"] = custom_params
    out = eng.generate(input_ids=prompts, sampling_params=params)
    return [o["output_ids"] for o in out], [o["meta_info"] for o in out]


def scored(eng, prompts, max_new_tokens=12, **custom):
    """Greedy tokens, their logprobs [prompts, new] and what compression did (meta_info's
    kv_compression, None under --kv full), per prompt; `custom` goes to custom_params."""
    import torch

    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    if custom:
        params["custom_params"] = custom
    out = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    tokens = [o["output_ids"] for o in out]
    logprobs = torch.tensor([[lp for lp, *_ in o["meta_info"]["output_token_logprobs"]] for o in out])
    return tokens, logprobs, [o["meta_info"].get("kv_compression", [None])[0] for o in out]


def flush(eng, timeout_s=60.0):
    """Flush the radix cache and KV pool, waiting for the scheduler to go idle.

    ``Engine.flush_cache()`` refuses at once while the scheduler still holds the batch that just
    finished (a race a slow machine loses); SGLang's deferred flush waits for idle instead.
    """
    result = eng.loop.run_until_complete(eng.tokenizer_manager.flush_cache(timeout_s=timeout_s))
    assert result.success, f"cache flush failed: {result.message}"


def read_trace(path):
    """Last block list per request id, and the flush events."""
    blocks, flushes = {}, []
    with open(path) as f:
        for line in f:
            event = json.loads(line)
            if event["event"] == "blocks":
                blocks[event["rid"]] = event
            elif event["event"] == "flush":
                flushes.append(event)
    return blocks, flushes
