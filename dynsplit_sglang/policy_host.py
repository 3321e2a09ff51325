"""What every dynsplit-sglang attention backend does around SGLang's attention: drive the policy.

`PolicyHost` is a mixin for an SGLang attention backend (torch-native or FlashInfer). It builds
the policy for the KV pool, keeps its per-slot state alive exactly as long as the KV slots,
tells it each forward's requests, feeds it the statistics of its score and query layers, and
selects the KV slots of each sparse decode step. The backend itself only computes attention.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool
from torch.profiler import record_function

from dynsplit_sglang import compression_stats, eviction, metrics, request_options
from dynsplit_sglang.block_table import ModelShape
from dynsplit_sglang.compression_stats import CompressionStats
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.decode_step import DecodeStep, Selecting, SlidingWindow
from dynsplit_sglang.delimiters import TokenTexts
from dynsplit_sglang.gpu_path import selection_kernel
from dynsplit_sglang.hybrid_layers import compressed_layers
from dynsplit_sglang.kernels.dd_select import band_logits, decode_band_logits, row_lse
from dynsplit_sglang.kernels.dense_attention import extend_attention, sliding_window_attention, window_slots
from dynsplit_sglang.patches import prefix_reserve
from dynsplit_sglang.policies import RequestView
from dynsplit_sglang.policies.base import forget_rows
from dynsplit_sglang.policies.policy_set import build_policy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowRequest:
    """The request in a req_to_token row, read when it got the row (request_options).

    generation:    SGLang's allocation count of the row then (a new count: a new request, or the
                   same one retracted and prefilled again).
    evict:         eviction is on for it (eviction.py).
    eviction:      where its private prompt is compacted to; None: nothing to compact.
    """

    rid: str | None
    budget: int
    policy: str
    prompt_len: int | None
    generation: int
    evict: bool
    eviction: eviction.Eviction | None


class PolicyHost:
    """Mixin: call `_init_policy` after the SGLang backend's __init__, `_begin_forward` from
    `init_forward_metadata`, `_observe_prefill` / `_observe_decode` from the forwards of every
    compressed layer, and `_finish_layer` last in each layer's forward.

    A hybrid model's sliding-window layers are not compressed (hybrid_layers.py): the backend
    attends over their window only there (`_dense_extend`, `DecodeStep.sliding`) and the policy
    never sees them (`_policy_layer(layer)` is None). The policy counts the compressed layers
    only; `_policy_layer` maps a model layer to its index there."""

    def _init_policy(self, model_runner, kv: KVConfig, make_sparse_attention) -> None:
        """make_sparse_attention(shape) -> (name, op): the op sparse decode steps attend with, of
        `kernels.sparse_attention.sparse_decode_attention_batched`'s signature."""
        pool = self.token_to_kv_pool
        if type(pool) is not MHATokenToKVPool or self.use_sliding_window_kv_pool:
            raise ValueError(
                f"--kv {kv.policy} supports models with plain multi-head/grouped-query attention "
                f"only; this model uses {type(pool).__name__}"
            )
        mc = model_runner.model_config
        # model layer ids the policy compresses, and each model layer's index among them
        self._compressed = compressed_layers(mc.hf_text_config, pool.layer_num)
        self._layer_index = [None] * pool.layer_num
        for index, layer_id in enumerate(self._compressed):
            self._layer_index[layer_id] = index
        self._last_layer = pool.layer_num - 1
        # a sliding layer reads this many of the last tokens (SGLang's window is exclusive)
        self._window = model_runner.sliding_window_size + 1 if len(self._compressed) < pool.layer_num else 0
        keys0 = pool.get_key_buffer(self._compressed[0])
        self.shape = ModelShape(
            num_layers=len(self._compressed),
            num_heads=pool.head_num * _query_heads_per_kv_head(mc.hf_text_config),
            num_kv_heads=pool.head_num,
            head_dim=pool.head_dim,
        )
        # The resolved value: the ServerArgs field stays None when the tokenizer is the model's own
        # (SGLang 0.5.23 records defaults as resolutions), which once left every token a candidate.
        tokens = TokenTexts(resolved_view(model_runner.server_args).tokenizer_path, mc.vocab_size)
        self.kv = kv
        self.policy = build_policy(kv, self.shape, keys0.shape[0], keys0.dtype, self.device, tokens)
        self._sparse_attention_name, self._sparse_attention = make_sparse_attention(self.shape)
        self._selection_name = selection_kernel(self.device)
        self.policy.use_gpu_selection(self._selection_name == "triton")
        needs = self.policy.needs
        self._score_layers = needs.score_layers
        self._query_layers = needs.query_layers
        self._query_window = needs.query_window
        self._band_width = needs.band_width
        self._score_heads = None if needs.score_heads is None else torch.tensor(needs.score_heads, device=self.device)
        # A radix hit must recompute the prompt's last queries its policy ranks with.
        members = getattr(self.policy, "members", {kv.policy: self.policy})
        prefix_reserve.set_reserve({label: p.needs.query_window for label, p in members.items()}, kv.policy)
        request_options.enable(kv)
        self._allocator = model_runner.token_to_kv_pool_allocator
        self._plan = eviction.EvictionPlan(
            {label: p.resident_bound for label, p in members.items()},
            {label: getattr(o, "evict", False) for label, o in kv.policies.items()},
            kv.policy,
            kv.budget,
            getattr(self._allocator, "page_size", 1),
            min_kept=self._window,
        )
        eviction.install(self._plan)
        self._row_request: dict[int, RowRequest] = {}
        self._compression = CompressionStats(
            self.req_to_token_pool.req_to_token.shape[0], self.shape.num_layers, self.device
        )
        compression_stats.install(self._compression)
        self._clock = metrics.SelectionClock(self.device) if metrics.enabled() else None
        self._lock = threading.Lock()
        self._reqs: list[RequestView] = []
        self._step: DecodeStep | None = None  # the decode step's requests, for every layer
        self._graph_capture = False  # a decode CUDA-graph capture (or its warmup) is running
        self._kv_available_at_start = self._allocator.available_size()
        self._hook_allocator(self._allocator)
        self.policy.trace({"event": "init", "kv_available": self._kv_available_at_start, **self.policy.stats()})
        logger.info(
            "dynsplit-sglang: --kv %s, budget %d, %s, score layers %s%s, attention backend %s, decode selection: %s, "
            "sparse attention: %s",
            kv.policy,
            kv.budget,
            f"compressed layers {list(self._compressed)} (the others slide over {self._window} tokens)"
            if self._window
            else f"{self.shape.num_layers} layers",
            sorted(self._score_layers),
            f", variants {', '.join(kv.variants)}" if kv.variants else "",
            type(self).__name__,
            self._selection_name,
            self._sparse_attention_name,
        )

    # --- slot lifetime: policy state lives and dies with the KV slots -------------------------
    def _hook_allocator(self, allocator) -> None:
        free, clear = allocator.free, allocator.clear

        def free_and_release(free_index):
            with self._lock:
                self.policy.release_slots(free_index)
            return free(free_index)

        def clear_and_reset():
            with self._lock:  # what finished requests left (dropped at each prefill) goes first
                self._release_rows(set())
            before = self._stats()
            result = clear()
            with self._lock:
                self.policy.reset()
                self._plan.reset()
                self._compression.reset()
            self.policy.trace(
                {
                    "event": "flush",
                    "kv_available": allocator.available_size(),
                    "kv_available_at_start": self._kv_available_at_start,
                    "before": before,
                    "after": self._stats(),
                }
            )
            return result

        allocator.free = free_and_release
        allocator.clear = clear_and_reset

    def _stats(self) -> dict:
        """Counters of every per-request table (the policy's, the eviction plan's, the host's
        request per row): a leak check reads them at a cache flush, when no request runs."""
        return {
            **self.policy.stats(),
            **self._plan.stats(),
            "row_requests": len(self._row_request),
            "compression_rows": len(self._compression),
        }

    # --- per-batch metadata -------------------------------------------------------------------
    def _begin_forward(self, forward_batch, num_rows: int | None = None) -> None:
        """Tell the policy which requests this forward computes, with their options.

        num_rows: the batch's real requests, its first rows (a CUDA-graph replay pads the batch
        to a captured size, and its view of the batch carries no request ids)."""
        self._graph_capture = False
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self._reqs = []
            return
        if not (mode.is_decode() or mode.is_extend_without_speculative()) or mode.is_mixed():
            raise ValueError(f"--kv {self.kv.policy} does not support forward mode {mode.name}")
        is_decode = mode.is_decode()
        req_to_token = self.req_to_token_pool.req_to_token
        seq_lens = forward_batch.seq_lens[:num_rows].tolist()
        rows = forward_batch.req_pool_indices[:num_rows].tolist()
        if is_decode:
            starts = [n - 1 for n in seq_lens]
        else:
            starts = forward_batch.extend_prefix_lens.tolist()
        ids = forward_batch.input_ids
        rids = getattr(forward_batch, "rids", None) or [None] * len(rows)
        # SGLang counts each row's allocations: a new count is a new request in the row (or the
        # same one, retracted and prefilled again)
        generations = self.req_to_token_pool.req_generation[rows].tolist()
        reqs, renewed, offset = [], set(), 0
        for row, n, s, rid, generation in zip(rows, seq_lens, starts, rids, generations):
            new = n - s
            # a replay's batch has no rids: the row's own (policies key per-request state by it)
            known, changed = self._request_in(row, rid, generation, None if is_decode else s)
            if changed:
                renewed.add(row)
            slots, ev = req_to_token[row, :n].to(torch.int64), known.eviction
            gap = 0 if ev is None or not is_decode else ev.gap  # a decode-time policy's compacted prompt
            released = ev.start - ev.prefix if ev is not None and ev.published else 0
            self._compression.forward(row, n, released, is_decode)
            reqs.append(
                RequestView(
                    ev.view(slots) if gap else slots,
                    s - gap,
                    ids[offset : offset + new],
                    known.rid,
                    row,
                    known.budget,
                    known.policy,
                    None if known.prompt_len is None else known.prompt_len - gap,
                    known.evict,
                )
            )
            offset += new
        if not is_decode:
            self._release_rows(renewed)
        self._reqs = reqs
        with record_function("dynsplit:begin_step"):
            self.policy.begin_forward(reqs, is_decode)
            self._step = None
            if is_decode:
                longer = [i for i, r in enumerate(reqs) if r.seq_len > r.budget]
                self._step = DecodeStep.build(
                    [r.row_slots for r in reqs],
                    rows,
                    [self.policy.sparse_in_layer(layer, longer) for layer in range(self.shape.num_layers)],
                    self.device,
                    self._sliding_window(forward_batch, len(reqs), seq_lens) if self._window else None,
                )
                self._compression.dense(self._step)

    def _sliding_window(self, forward_batch, num_rows: int, seq_lens: list[int]) -> SlidingWindow:
        """The slots this decode step's queries read in the sliding-window layers."""
        slots, valid = window_slots(
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices[:num_rows],
            forward_batch.seq_lens[:num_rows],
            self._window - 1,
        )
        heads = self.shape.num_kv_heads
        return SlidingWindow(
            slots[:, None].expand(-1, heads, -1),
            valid[:, None].expand(-1, heads, -1),
            [min(n, self._window) for n in seq_lens],
        )

    def _release_rows(self, renewed: set[int]) -> None:
        """Drop the per-request state (prefill-time rankings, layer budgets, options) of the
        requests that left their rows: the rows SGLang has freed, as their requests finished or
        were retracted, and those a new request takes in this prefill. Done at each prefill, the
        forward that takes memory for new requests, so what left lasts until then and never
        outgrows what the rows' live requests may hold."""
        free = set(getattr(self.req_to_token_pool, "free_slots", ()))
        self.policy.release_rows(free | renewed)
        self._plan.forget(free)
        forget_rows(self._row_request, free)
        self._compression.drop(free)

    def _request_in(self, row: int, rid, generation: int, prefix: int | None) -> tuple[RowRequest, bool]:
        """(the request in this row, whether it is new to the host): its custom_params.kv_budget,
        kv_policy and kv_evict, else the server's --kv-budget, --kv policy and its `evict`. They
        are read when a request gets the row (SGLang's allocation count of the row changes); a
        retracted request that comes back, in this row or another, reads them again. Without a
        rid (a CUDA-graph replay), the row's request is the one its prefill registered: prefill always runs eager
        and names its requests, and a row changes hands only through a prefill. prefix: the
        tokens SGLang found in the radix cache, at a prefill (None at decode): a request met
        first decides here whether and where it evicts."""
        known = self._row_request.get(row)
        changed = known is None or known.generation != generation or (rid is not None and known.rid != rid)
        if changed:
            asked = request_options.options(rid)
            req = request_options.request(rid)
            evict, start = (False, None) if req is None or prefix is None else self._plan.of_request(req, prefix)
            self._plan.forget({row})  # the row's previous request
            budget = self.kv.budget if asked.budget is None else asked.budget
            policy = asked.policy or self.kv.policy
            known = RowRequest(
                rid,
                budget,
                policy,
                request_options.prompt_len(rid),
                generation,
                evict,
                None if start is None else self._plan.begin(row, generation, rid, prefix, start, policy),
            )
            self._row_request[row] = known
            self._compression.begin(row, rid, policy, budget, evict)
        return known, changed

    def _policy_layer(self, layer) -> int | None:
        """The layer's index among the compressed layers; None for a sliding-window layer."""
        return self._layer_index[layer.layer_id]

    def _check_layer(self, layer) -> None:
        """One clear error for a layer the policies cannot serve, at its first forward."""
        if layer.is_cross_attention or layer.qk_head_dim != layer.v_head_dim:
            raise ValueError(f"--kv {self.kv.policy} does not support cross attention or MLA-style heads")
        if layer.attn_type in (AttentionType.ENCODER_ONLY, AttentionType.DECODER_BIDIRECTIONAL):
            raise ValueError(
                f"--kv {self.kv.policy} supports causal attention layers only; layer {layer.layer_id} is bidirectional"
            )
        sliding = (layer.sliding_window_size or -1) > -1
        if sliding != (self._policy_layer(layer) is None):
            # a window the config's layer_types do not name (or the reverse): which KV is bounded is unknown
            raise ValueError(
                f"--kv {self.kv.policy} supports full-attention layers and the sliding-window layers of a "
                f"model whose config lists them in layer_types; layer {layer.layer_id} "
                + ("is sliding-window" if sliding else "has no window though layer_types says sliding_attention")
            )
        if sliding and layer.sliding_window_size + 1 != self._window:  # one window per step (DecodeStep.sliding)
            raise ValueError(
                f"--kv {self.kv.policy} supports one sliding window for all layers; layer {layer.layer_id} "
                f"slides over {layer.sliding_window_size + 1} tokens, the model over {self._window}"
            )
        if (getattr(layer, "logit_cap", 0.0) or 0.0) > 0:  # Gemma 2: our attention ops do not soft-cap
            raise ValueError(
                f"--kv {self.kv.policy} does not support attention logit soft-capping (layer {layer.layer_id}: "
                f"logit_cap {layer.logit_cap})"
            )

    def _finish_layer(self, layer) -> None:
        if layer.layer_id == self._last_layer:
            key_buffers = [self.token_to_kv_pool.get_key_buffer(i) for i in self._compressed]
            with self._lock, record_function("dynsplit:end_step"):
                self.policy.end_forward(self._reqs, key_buffers)
                self._compact()
            if self._clock is not None and self._step is not None:
                metrics.selection_seconds(self.kv.policy, self._clock.end_step())

    def _compact(self) -> None:
        """Eviction (eviction.py): each request whose prompt this forward ranked moves the kept
        tokens of its private prompt to [start, prompt_end) of its row, and its policy reads them
        there. Every layer has run its attention: nothing of this forward reads the prompt again.
        Only the compressed layers move: a sliding layer's KV at [start, prompt_end) is the
        window the request's next tokens read (EvictionPlan keeps start at least a window back)."""
        pool = self.token_to_kv_pool
        for i, r in enumerate(self._reqs):
            ev = self._row_request[r.row].eviction
            if not r.ends_prompt():
                continue
            if ev is None:
                if r.evict and self.policy.closes_gap(r):
                    # Nothing to free (its radix hit covers what would go), yet a decode-time
                    # policy reads only its resident set, in place: a hit changes no answer.
                    kept = self.policy.kept_positions(i, r, r.prompt_end)
                    self.policy.compacted(i, r, r.prompt_end, kept, kept)
                continue
            kept = self.policy.kept_positions(i, r, ev.prefix)
            to, closes_gap = ev.start, self.policy.closes_gap(r)
            if closes_gap:  # the same tokens in every layer and head, right before the prompt's end
                to = max(to, r.prompt_end - int((kept[0, 0] >= ev.prefix).sum()))
            moved = eviction.compacted_positions(kept, ev.prefix, to, r.prompt_end)
            if moved is None:  # cannot happen: a policy keeps at most its resident_bound
                logger.error("dynsplit-sglang: request %s keeps more than its compacted slots hold", r.rid)
                continue
            for index, layer_id in enumerate(self._compressed):
                buffers = (pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id))
                eviction.move_kv(buffers, r.row_slots, kept[index], moved[index])
            self.policy.compacted(i, r, ev.prefix, kept, moved)
            ev.compacted = True
            if closes_gap:
                ev.gap_end = to

    def _save_kv(self, layer, forward_batch, k, v, save_kv_cache: bool) -> None:
        """Write this forward's keys and values into the pool (a plain pool: no sliding-window part)."""
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)

    # --- breakable CUDA graphs (decode) ------------------------------------------------------
    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Before a decode graph is captured and before each replay (never inside the graph);
        SGLang's breakable decode graphs call it instead of `init_forward_metadata`.

        Capture runs the forward on a dummy batch: the backend's attention break (its `_decode`,
        marked `eager_on_graph`) then only hands back an output buffer, and the policy sees
        nothing. A replay's `forward_batch` is SGLang's view of the padded batch (`num_padding`
        dummy rows after the real ones, no request ids)."""
        if not forward_batch.forward_mode.is_decode():
            return super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if in_capture:
            self._reqs = []
            self._graph_capture = True
            return None
        padding = getattr(forward_batch, "num_padding", 0) or 0
        self._begin_forward(forward_batch, num_rows=forward_batch.batch_size - padding)
        return None

    # --- prefill ------------------------------------------------------------------------------
    def _dense_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool) -> torch.Tensor:
        """Dense causal attention of the new tokens with each query's row lse (`extend_attention`),
        and the policy's observations of this layer; in a sliding-window layer each query over
        its window only (`sliding_window_attention`: SGLang's torch-native path attends the whole
        sequence under an N x N mask), nothing observed. returns the output, shaped like q."""
        self._save_kv(layer, forward_batch, k, v, save_kv_cache)
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty_like(q)
        args = (
            q3,
            o.view_as(q3),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
            forward_batch.extend_prefix_lens,
            forward_batch.extend_seq_lens,
            layer.scaling,
        )
        if self._policy_layer(layer) is None:
            sliding_window_attention(*args, layer.sliding_window_size)
        else:
            self._observe_prefill(q3, layer, extend_attention(*args))
        return o

    def _observe_prefill(self, q3: torch.Tensor, layer, lses: list[torch.Tensor] | None) -> None:
        """The policy gets the queries of the prompt's last tokens in its query layers (those this
        forward computes; RequestView.prompt_queries) and the band logits and row lse
        of its score layers. q3: [T, H, D] the new queries of every request, back to back;
        lses: per request [H, n] the row lse of its new queries (needed in score layers)."""
        index = self._policy_layer(layer)
        if index in self._query_layers:
            offset = 0
            for i, r in enumerate(self._reqs):
                n, mine = r.seq_len - r.new_start, r.prompt_queries(self._query_window)
                if mine.stop > mine.start:
                    self.policy.observe_queries(index, i, q3[offset + mine.start : offset + mine.stop], layer.scaling)
                offset += n
        if index in self._score_layers:
            keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            width, heads = self._band_width, self._score_heads
            offset = 0
            for i, r in enumerate(self._reqs):
                n, s = r.seq_len - r.new_start, r.new_start
                lo = max(0, s - width + 1)  # the band reads only the keys from here on
                band = band_logits(q3[offset : offset + n], keys[r.row_slots[lo:]], s - lo, layer.scaling, width, heads)
                self.policy.observe(index, i, band, lses[i] if heads is None else lses[i][heads])
                offset += n

    # --- decode -------------------------------------------------------------------------------
    def _sparse_requests(self, layer) -> Selecting | None:
        """Requests of this decode step that select in this compressed layer: those longer than
        their budget, outside their policy's dense layers (the others attend densely); None if
        none does."""
        return self._step.selecting[self._policy_layer(layer)]

    def _select_slots(self, q3, layer, sel: Selecting) -> tuple[torch.Tensor, torch.Tensor]:
        """KV slots and valid mask [S, KvH, W] the requests `sel` attend to in this layer."""
        mark = None if self._clock is None else self._clock.start()
        with record_function("dynsplit:select"):
            slots, valid = self.policy.select_slots_batch(self._policy_layer(layer), sel, q3.index_select(0, sel.index))
        if mark is not None:
            self._clock.stop(mark)
        self._compression.selected(self._step.rows[sel.index], valid)
        return slots, valid

    def _observe_decode(self, q3, layer, lse: torch.Tensor, missing) -> None:
        """The DD-Select rows of this step's new tokens in a score layer, for every request at
        once. lse: [n, H] the row lse of each request's query over what it attended (a sparse
        one's mass is relative to that: its full row was not read), except for the requests
        `missing`, which SGLang's dense op attended: theirs is computed here."""
        with record_function("dynsplit:dd_rows"):
            step, heads = self._step, self._score_heads
            keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            n = len(self._reqs)
            band = decode_band_logits(q3[:n], keys, step.slots, step.seq_lens, layer.scaling, self._band_width, heads)
            lse = lse[:n] if heads is None else lse[:n, heads]
            for i in missing:  # sequences within their budget: short, and rare once a batch is long
                length = step.lengths[i]
                lse[i] = row_lse(q3[i : i + 1], keys[step.slots[i, :length]], length - 1, layer.scaling, heads)[:, 0]
            self.policy.observe_step(self._policy_layer(layer), band, lse.T)


def _query_heads_per_kv_head(hf_config) -> int:
    heads = hf_config.num_attention_heads
    return heads // (getattr(hf_config, "num_key_value_heads", None) or heads)
