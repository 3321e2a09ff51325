"""A setup (`in_sglang_processes("tests.failing_setup:install")`) that makes SGLang's scheduler fail:
while it starts, when it builds the attention backend ($FAIL_AT=start, the default), or at its
first forward ($FAIL_AT=forward). How a failing scheduler looks to the test that started it."""

import multiprocessing
import os


def install() -> None:
    if multiprocessing.current_process().name == "MainProcess":
        return
    from dynsplit_sglang.policy_host import PolicyHost

    def fail(self, *args, **kwargs):
        raise RuntimeError("failing_setup: this scheduler fails")

    if os.environ.get("FAIL_AT", "start") == "start":
        PolicyHost._init_policy = fail
    else:
        PolicyHost._begin_forward = fail
