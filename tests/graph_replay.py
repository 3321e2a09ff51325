"""What a breakable-CUDA-graph decode replay hands our attention backends, emulated on the
CPU (SGLang captures graphs only on CUDA).

At replay SGLang does not call `init_forward_metadata`: it calls the backend's
`init_forward_metadata_out_graph` with its view of the batch padded to the captured batch size
(dummy rows after the real ones: seq_len 1, request row 0, no request ids), replays the captured
segments, and calls each layer's attention break with the capture's arguments: static buffers
with the padded rows, read for their current contents. `install()` makes every decode step of an
engine go through exactly that path (the stand-ins for FlashInfer included), runs a capture's
dummy batch through the first layer once (it must touch nothing), and checks that the padding
rows come back as zeros and that the per-request counts it plans from the host are what the
selection made; run it in the scheduler with `in_sglang_processes("tests.graph_replay:install")`
(dynsplit_sglang.testing.process_setup). What it saw goes to the file named by
$GRAPH_REPLAY_LOG, one line per event ("capture ok", "replay", or what went wrong), for the test
to read: raising in the scheduler would kill the test process with it.
"""

from __future__ import annotations

import multiprocessing
import os
from types import SimpleNamespace

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

PADDING = 2  # dummy rows, as a batch rounded up to a captured size has


def _log(line: str) -> None:
    with open(os.environ["GRAPH_REPLAY_LOG"], "a") as f:
        f.write(line + "\n")


def _pad(t: torch.Tensor, value) -> torch.Tensor:
    return torch.cat([t, t.new_full((PADDING, *t.shape[1:]), value)])


def replay_view(fb) -> SimpleNamespace:
    """SGLang's `build_replay_fb_view` of a decode batch (the fields a backend reads)."""
    n = fb.batch_size
    return SimpleNamespace(
        batch_size=n + PADDING,
        num_padding=PADDING,
        forward_mode=fb.forward_mode,
        input_ids=_pad(fb.input_ids, 0),
        positions=_pad(fb.positions, 0),
        req_pool_indices=_pad(fb.req_pool_indices, 0),
        seq_lens=_pad(fb.seq_lens, 1),
        seq_lens_cpu=None if fb.seq_lens_cpu is None else _pad(fb.seq_lens_cpu, 1),
        out_cache_loc=fb.out_cache_loc,
        spec_info=None,
        encoder_lens=None,
    )


def install() -> None:
    from dynsplit_sglang.backend_flashinfer import SparseFlashInferAttnBackend
    from dynsplit_sglang.backend_torch import SparseTorchAttnBackend
    from dynsplit_sglang.sparse_decode_flashinfer import FlashInferSparseAttention
    from dynsplit_sglang.testing.fake_flashinfer import install_in_sglang

    install_in_sglang()  # every process: a server's launcher validates --attention-backend with it
    if multiprocessing.current_process().name == "MainProcess":
        return  # the backends run in the scheduler; patching them here would outlive the test
    for backend in (SparseTorchAttnBackend, SparseFlashInferAttnBackend):
        _replay_decode_steps(backend)

    # The counts the FlashInfer decode plans with come from the host; they must be what the
    # selection made.
    attend = FlashInferSparseAttention.__call__

    def checked(self, q, keys, values, slots, valid, scale, counts=None):
        made = valid.sum(dim=2)
        if counts is None or made.tolist() != [[c] * made.shape[1] for c in counts]:
            _log(f"host counts {counts} are not the selection's {made.tolist()}")
        return attend(self, q, keys, values, slots, valid, scale, counts=counts)

    FlashInferSparseAttention.__call__ = checked


def _replay_decode_steps(backend_class) -> None:
    eager_init = backend_class.init_forward_metadata

    def init_forward_metadata(self, fb):
        if not fb.forward_mode.is_decode():
            return eager_init(self, fb)
        return self.init_forward_metadata_out_graph(replay_view(fb), in_capture=False)

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True):
        self._check_layer(layer)
        n = q.shape[0]
        if not getattr(self, "_emulated_capture", False):
            _capture_once(self, q, k, v, layer, save_kv_cache)
        # The capture's batch: its per-row buffers, padded (padding KV goes to slot 0, SGLang's
        # padding slot); the padded query rows hold garbage, which must not leak anywhere.
        statics = SimpleNamespace(
            out_cache_loc=_pad(fb.out_cache_loc, 0),
            req_pool_indices=_pad(fb.req_pool_indices, 0),
            seq_lens=_pad(fb.seq_lens, 1),
            encoder_lens=None,
        )
        garbage = lambda t: torch.cat([t, torch.randn((PADDING, *t.shape[1:]), dtype=t.dtype)])  # noqa: E731
        out = self._decode.run_eager(garbage(q), garbage(k), garbage(v), layer, statics, save_kv_cache)
        if out.shape[0] != n + PADDING or out[n:].any():
            _log(f"layer {layer.layer_id}: the padding rows' output is not 0 (shape {tuple(out.shape)})")
        elif layer.layer_id == 0:
            _log("replay")
        return out[:n]

    backend_class.init_forward_metadata = init_forward_metadata
    backend_class.forward_decode = forward_decode


def _capture_once(backend, q, k, v, layer, save_kv_cache) -> None:
    """A capture before the first replay: SGLang sets up the backend's graph state, plans a
    dummy batch (`in_capture=True`) and runs the forward on it; the attention break must hand
    back zeros and leave the policy alone, and no graph buffers are needed."""
    real = (backend._reqs, backend._graph_capture)
    before = backend.policy.stats()
    rows = q.shape[0] + PADDING
    try:
        backend.init_cuda_graph_state(rows, rows)  # SGLang's decode graph runner, at its start
    except Exception as e:  # SGLang's own allocates on "cuda"; raising here would kill the test
        _log(f"capture: init_cuda_graph_state failed: {e!r}")
    if hasattr(backend, "cuda_graph_kv_indices"):
        _log("capture: the backend allocated graph buffers its decode never reads")
    dummy = SimpleNamespace(batch_size=rows, num_padding=0, forward_mode=ForwardMode.DECODE)
    backend.init_forward_metadata_out_graph(dummy, in_capture=True)
    statics = SimpleNamespace(
        out_cache_loc=torch.zeros(rows, dtype=torch.int64), req_pool_indices=torch.zeros(rows, dtype=torch.int64)
    )
    out = backend._decode.run_eager(
        *(torch.randn((rows, *t.shape[1:]), dtype=t.dtype) for t in (q, k, v)), layer, statics, save_kv_cache
    )
    ok = out.shape == (rows, q.shape[1]) and not out.any() and backend.policy.stats() == before and not backend._reqs
    _log("capture ok" if ok else "capture: the dummy batch reached the policy or the output")
    backend._reqs, backend._graph_capture = real
    backend._emulated_capture = True
