"""What each forward hands the policy, logged from SGLang's scheduler for a test to read.

Run it with `in_sglang_processes("tests.forward_log:install")`; every forward appends one JSON line
{"decode": bool, "reqs": [[rid, budget, policy label, req_to_token row, prompt_len, new_start,
ranked, gap], ...], "stats": the policy's stats() when the forward begins} to the file named by
$FORWARD_LOG (raising in the scheduler would kill the test process with it). `ranked` is the prompt
length of the request's ranking when the policy that answers it is a prefill-time one and has
ranked it (else None). `gap`: the prompt tokens a decode-time policy's eviction closed up (a
decode's prompt_len and positions are those of the compacted prompt), else 0.
"""

from __future__ import annotations

import json
import multiprocessing
import os


def install() -> None:
    if multiprocessing.current_process().name == "MainProcess":
        return  # the backends run in the scheduler; patching them here would outlive the test
    from dynsplit_sglang.policy_host import PolicyHost

    begin = PolicyHost._begin_forward

    def logged(self, forward_batch, num_rows=None):
        begin(self, forward_batch, num_rows)
        members = getattr(self.policy, "members", {self.kv.policy: self.policy})

        def ranked(r):
            rk = getattr(members.get(r.policy), "_rankings", {}).get(r.row)
            return rk.prompt_len if rk is not None and rk.rid == r.rid else None

        def gap(r):
            ev = self._row_request[r.row].eviction
            return ev.gap if ev is not None and forward_batch.forward_mode.is_decode() else 0

        line = {
            "decode": forward_batch.forward_mode.is_decode(),
            "reqs": [
                [r.rid, r.budget, r.policy, r.row, r.prompt_len, r.new_start, ranked(r), gap(r)] for r in self._reqs
            ],
            "stats": self.policy.stats(),
        }
        with open(os.environ["FORWARD_LOG"], "a") as f:
            f.write(json.dumps(line) + "\n")

    PolicyHost._begin_forward = logged
