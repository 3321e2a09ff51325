"""A failing SGLang subprocess fails the test that started the engine, not the whole test run.

SGLang's scheduler and detokenizer send SIGQUIT to their parent when they fail, and SGLang's
handlers then kill the parent's whole process tree: pytest, with every result so far. Two
handlers do it: one while the engine starts (`custom_sigquit_handler` replaces it), one installed
by the TokenizerManager's event loop at the first request (`signal_handler_class` replaces it).
The tests' engines (`engine_utils.engine`) use the ones here, which make the pending call raise,
and then clean up what a normal exit would not: the subprocesses, the dead engine's asyncio tasks
(SGLang's task wrapper kills the process tree when one fails later) and its zmq sockets (when the
garbage collector finalizes their context it would wait forever to deliver what is queued).
"""

from __future__ import annotations

import asyncio
import contextlib


class SubprocessFailed(RuntimeError):
    """An SGLang subprocess (scheduler, detokenizer) failed and signalled the test process."""


MESSAGE = "an SGLang subprocess failed (it sent SIGQUIT); its log is above"


def raise_on_sigquit(signum, frame):
    """The start-phase handler (module level: the server arguments that carry it are pickled)."""
    raise SubprocessFailed(MESSAGE)


def stop_loop_on_sigquit(eng) -> None:
    """Give the engine a running-phase handler that stops its event loop, so that the pending
    call raises (called before the engine's first request)."""
    from sglang.srt.managers.tokenizer_manager import SignalHandler

    class StopLoop(SignalHandler):
        def running_phase_sigquit_handler(self, signum=None, frame=None):
            self.tokenizer_manager.subprocess_failed = True
            self.tokenizer_manager.event_loop.stop()

    eng.tokenizer_manager.signal_handler_class = StopLoop


def failed(eng) -> bool:
    return getattr(eng.tokenizer_manager, "subprocess_failed", False)


def child_pids() -> set[int]:
    """The pids of this process's subprocesses, at every depth."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def new_children(before: set[int]) -> list:
    """The subprocesses (psutil.Process) started since `before` = child_pids() was taken."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def kill_new_children(before: set[int]) -> None:
    """Kill the subprocesses started since `before` = child_pids() was taken."""
    import psutil

    for p in new_children(before):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def release(tokenizer_manager, more_tasks=()) -> None:
    """Cancel a dead engine's asyncio tasks (and `more_tasks`, e.g. a request a stopped event loop
    left pending) and close its zmq sockets."""
    loop = getattr(tokenizer_manager, "event_loop", None)
    tasks = {t for t in (*getattr(tokenizer_manager, "asyncio_tasks", ()), *more_tasks) if not t.done()}
    for t in tasks:
        t.cancel()
    if loop is not None and tasks and not loop.is_running():
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    close_sockets([tokenizer_manager])


def close_sockets(objects) -> None:
    """Close the contexts of the zmq sockets these objects hold, dropping what is queued."""
    import zmq

    for value in objects:
        for attr in list(getattr(value, "__dict__", {}).values()):
            if isinstance(attr, zmq.Socket) and not attr.context.closed:
                attr.context.destroy(linger=0)


def frame_locals(error: BaseException):
    """Every local variable of the frames the error went through (a failed start leaves the
    TokenizerManager it built there)."""
    tb = error.__traceback__
    while tb is not None:
        yield from tb.tb_frame.f_locals.values()
        tb = tb.tb_next
