"""How a whole-model KV budget is shared between layers (PyramidKV, WindowKV, DynamicKV).

Every function returns integer per-layer budgets whose sum is `num_layers * mean` (or less where a
layer cannot use its share: no layer gets more than `cap` tokens, the tokens it can choose from).
Where the papers' integer arithmetic drifts from the mean (floored steps, "the last layer absorbs
the remainder"), we round with largest remainders instead, so every policy spends the same total.
"""

from __future__ import annotations

import math

import torch


def proportional(weights: list[float], total: int, cap: int) -> list[int]:
    """Integers proportional to `weights`, summing to min(total, cap * len(weights)), each <= cap.

    Water-filling: layers whose share exceeds `cap` are fixed at `cap` and the rest is re-shared;
    leftover units go to the largest fractional parts (ties: the earlier layer).
    """
    n = len(weights)
    if total >= cap * n:
        return [cap] * n
    alloc = [0] * n
    free = list(range(n))
    remaining = total
    while free:
        w = [max(0.0, float(weights[i])) for i in free]
        wsum = sum(w)
        share = [remaining / len(free)] * len(free) if wsum == 0 else [remaining * x / wsum for x in w]
        over = [i for i, s in zip(free, share) if s > cap]
        if not over:
            floors = [math.floor(s) for s in share]
            for i, f in zip(free, floors):
                alloc[i] = f
            left = remaining - sum(floors)
            by_fraction = sorted(range(len(free)), key=lambda k: (-(share[k] - floors[k]), free[k]))
            for k in by_fraction[:left]:
                alloc[free[k]] += 1
            break
        for i in over:
            alloc[i] = cap
            remaining -= cap
        free = [i for i in free if i not in over]
    return alloc


def pyramid(mean: int, num_layers: int, beta: int, cap: int) -> list[int]:
    """PyramidKV: budgets falling linearly from about 2*mean - mean/beta to mean/beta.

    With b_min = mean // beta and b_max = 2*mean - b_min (capped at `cap`, b_min then raised so the
    mean holds), layer l gets b_max - l * (b_max - b_min) / (L - 1), rounded to sum L * mean.
    """
    if mean >= cap:
        return [cap] * num_layers
    b_min = mean // beta
    b_max = min(2 * mean - b_min, cap)
    b_min = 2 * mean - b_max
    if num_layers == 1:
        return [mean]
    step = (b_max - b_min) / (num_layers - 1)
    return proportional([b_max - l * step for l in range(num_layers)], mean * num_layers, cap)


def group_pyramid(mean: int, num_layers: int, group: int, beta: int, cap: int) -> list[int]:
    """WindowKV's "arithmetic" group budgets: groups of `group` layers, the last group gets
    mean * group / beta, the first 2 * mean minus that, linear in between; every layer of a group
    gets its group's budget (the groups share selected windows). Scaled so the layers' sum is at
    most L * mean (the last group may be shorter than `group`)."""
    num_groups = -(-num_layers // group)
    last = mean * group / beta
    first = 2 * mean - last
    step = 0.0 if num_groups == 1 else (first - last) / (num_groups - 1)
    per_group = [first - g * step for g in range(num_groups)]
    sizes = [min(group, num_layers - g * group) for g in range(num_groups)]
    scale = mean * num_layers / sum(v * s for v, s in zip(per_group, sizes))
    per_group = [min(cap, math.floor(v * scale)) for v in per_group]
    return [per_group[l // group] for l in range(num_layers)]


def dynamickv(scores: torch.Tensor, mean: int, r_max: float, cap: int) -> list[int]:
    """DynamicKV's task-aware per-layer budgets.

    scores: [L, heads, P] pooled observation-window scores of the P prompt tokens outside the
            window, every layer.
    The global top-(mean * heads * L) scores over all layers and heads vote: layer j's share is
    the fraction c_j of them it holds; its temporary budget floor(bs_max * c_j) with
    bs_max = min(r_max * mean, P) is then rescaled so the budgets sum to L * mean (each <= cap).

    This is the update the authors' code runs after every m-th layer, taken once with all layers'
    scores. Their intermediate updates truncate a cache that, in SGLang, is never truncated (the KV
    stays resident and is selected from), and with the fix for the re-slicing quirk (keep the full
    sorted candidates until the final update) they cannot change the final budgets. Unlike their
    code, the final update also runs when L is not a multiple of m, so the whole-model budget holds.
    """
    num_layers, heads, p = scores.shape
    if p == 0 or mean >= cap:
        return [min(mean, cap)] * num_layers
    bs_max = min(int(r_max * mean), p)
    top = min(mean * heads * num_layers, scores.numel())
    idx = torch.topk(scores.reshape(-1).float(), top, sorted=False).indices
    counts = torch.bincount(idx // (heads * p), minlength=num_layers).tolist()
    share = [math.floor(bs_max * c / top) for c in counts]
    return proportional(share, mean * num_layers, cap)
