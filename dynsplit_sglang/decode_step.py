"""One decode step as every layer sees it: built once when the step starts, read by 30-odd layers.

Which requests select and which attend densely is the same in every layer (up to a policy's dense
first layers), and so are their KV slots by position; building those once spares each layer its
host lists, `torch.tensor(list)` copies and per-request loops (SGLang's forward metadata and
nano-vllm's `Context` do the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selecting:
    """The requests of a decode step that select in a layer (the others attend densely).

    indices: their places in the step's requests, ascending.
    index:   [S] int64, the same on the device; dense: [R - S] int64 the other requests, and
             dense_indices the same on the host.
    slots:   [S, max_len] int64 KV slots of each one's positions (the view the policy sees: a
             compacted request skips its freed gap), 0 past its length.
    """

    indices: tuple[int, ...]
    index: torch.Tensor
    dense: torch.Tensor
    dense_indices: tuple[int, ...]
    slots: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    @staticmethod
    def of(indices: tuple[int, ...], slots: torch.Tensor) -> Selecting:
        """The requests `indices` of a step whose requests' slots are `slots` [R, max_len]."""
        chosen = set(indices)
        rest = tuple(i for i in range(slots.shape[0]) if i not in chosen)
        index = torch.tensor(indices, dtype=torch.int64, device=slots.device)
        dense = torch.tensor(rest, dtype=torch.int64, device=slots.device)
        return Selecting(tuple(indices), index, dense, rest, slots[index])

    def slots_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The KV slots of positions [S, KvH, W] of these requests (row k: the k-th request's)."""
        return self.slots.gather(1, positions.reshape(len(self), -1)).view_as(positions)

    def subset(self, ks: list[int]) -> Selecting:
        """The requests at places ks of this one (for the members of a PolicySet)."""
        at = torch.tensor(ks, device=self.index.device)
        return Selecting(
            tuple(self.indices[k] for k in ks), self.index[at], self.dense, self.dense_indices, self.slots[at]
        )


@dataclass(frozen=True)
class SlidingWindow:
    """What a decode step's queries read in a hybrid model's sliding-window layers: each request's
    last min(n, window + 1) positions of its real req_to_token row (not the view its policy
    reads: eviction keeps those positions in place).

    slots, valid: [R, KvH, window + 1] (each row's valid entries first); counts: valid per request.
    """

    slots: torch.Tensor
    valid: torch.Tensor
    counts: list[int]


@dataclass(frozen=True)
class DecodeStep:
    """A decode step's requests, for every layer.

    seq_lens:     [R] int64 (each request's view), and on the host `lengths`.
    slots:        [R, max_len] int64 KV slots by position of every request, 0 past its length.
    selecting:    per layer, its Selecting (the same object for layers with the same requests),
                  or None where every request attends densely.
    rows:         [R] int64 each request's req_to_token row.
    dense_layers: per request, in how many layers it attends densely (to its whole view).
    sliding:      the sliding-window layers' reads (a hybrid model), else None.
    """

    lengths: tuple[int, ...]
    seq_lens: torch.Tensor
    slots: torch.Tensor
    selecting: tuple[Selecting | None, ...]
    rows: torch.Tensor
    dense_layers: tuple[int, ...]
    sliding: SlidingWindow | None = None

    @staticmethod
    def build(
        row_slots: list[torch.Tensor],
        rows: list[int],
        sparse_by_layer: list[list[int]],
        device,
        sliding: SlidingWindow | None = None,
    ) -> DecodeStep:
        """row_slots: per request [n_i] int64 KV slots; rows: their req_to_token rows;
        sparse_by_layer: per compressed layer the requests that select there (ascending)."""
        lengths = tuple(s.numel() for s in row_slots)
        dense_layers = [len(sparse_by_layer)] * len(row_slots)
        slots = torch.nn.utils.rnn.pad_sequence(row_slots, batch_first=True).to(device)
        made: dict[tuple[int, ...], Selecting] = {}
        selecting = []
        for sparse in sparse_by_layer:
            for i in sparse:
                dense_layers[i] -= 1
            key = tuple(sparse)
            if key and key not in made:
                made[key] = Selecting.of(key, slots)
            selecting.append(made.get(key))
        return DecodeStep(
            lengths,
            torch.tensor(lengths, device=device),
            slots,
            tuple(selecting),
            torch.tensor(rows, dtype=torch.int64, device=device),
            tuple(dense_layers),
            sliding,
        )
