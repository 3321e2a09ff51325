import pytest
import torch

from dynsplit_sglang.kernels.dd_select import (
    SCORE_QUANTUM,
    band_logits,
    band_rows_from_logits,
    candidate_scores,
    dd_band_rows,
)


def brute_force_rows(q, k, scale, L, R, alpha):
    """c[q, j-1] straight from the definition, with the full causal attention matrix."""
    n, H, D = q.shape
    group = H // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.double(), kk.double()) * scale
    logits.masked_fill_(torch.ones(n, n).triu(1).bool(), float("-inf"))
    A = logits.softmax(-1)  # [H, n, n]
    rows = torch.zeros(n, L, dtype=torch.double)
    for p in range(n):
        for j in range(1, L + 1):
            i = p - j
            if i < 0:
                continue
            retained = A[:, p, i + 1 : p + 1].sum(-1)
            distant = A[:, p, : max(0, i - R + 1)].sum(-1)
            rows[p, j - 1] = (retained - alpha * distant).mean()
    return rows


def test_rows_match_the_definition():
    torch.manual_seed(0)
    n, H, KvH, D, L, R = 40, 4, 2, 8, 5, 6
    q, k = torch.randn(n, H, D), torch.randn(n, KvH, D)
    got = dd_band_rows(q, k, 0, D**-0.5, L, R, alpha=0.7)
    want = brute_force_rows(q, k, D**-0.5, L, R, 0.7)
    valid = torch.arange(n)[:, None] - torch.arange(1, L + 1)[None, :] >= 0
    torch.testing.assert_close(got[valid].double(), want[valid], atol=1e-5, rtol=0)


def test_rows_do_not_depend_on_chunking():
    torch.manual_seed(1)
    n, H, KvH, D = 100, 4, 2, 8
    q, k = torch.randn(n, H, D), torch.randn(n, KvH, D)
    whole = dd_band_rows(q, k, 0, D**-0.5, 6, 6, 1.0)
    first = dd_band_rows(q[:37], k[:37], 0, D**-0.5, 6, 6, 1.0)
    second = dd_band_rows(q[37:], k, 37, D**-0.5, 6, 6, 1.0)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-6, rtol=0)


def test_retained_local_distant_partition_the_mass():
    # alpha = 0 gives the retained mass alone, which grows with j.
    band = torch.randn(3, 10, 7)
    lse = torch.logsumexp(torch.cat([band, torch.randn(3, 10, 20)], -1), -1)
    rows = band_rows_from_logits(band, lse, lookahead=4, local_window=3, alpha=0.0)
    assert (rows[..., 1:] >= rows[..., :-1]).all()
    assert ((rows >= 0) & (rows <= 1)).all()


def test_candidate_scores_average_the_diagonal_and_are_quantized():
    L = 3
    rows = torch.arange(5 * L, dtype=torch.float32).view(5, L) / 100  # rows of positions i0+1 .. i0+5
    scores = candidate_scores(rows, L)  # m = 5 - 3 + 1 = 3 candidates
    expect = torch.tensor(
        [
            (rows[0, 0] + rows[1, 1] + rows[2, 2]) / 3,
            (rows[1, 0] + rows[2, 1] + rows[3, 2]) / 3,
            (rows[2, 0] + rows[3, 1] + rows[4, 2]) / 3,
        ]
    )
    torch.testing.assert_close(scores, torch.round(expect / SCORE_QUANTUM) * SCORE_QUANTUM)


@pytest.mark.parametrize("n, q_start, width", [(40, 0, 7), (13, 50, 7), (1, 3, 7), (1, 300, 24), (1500, 0, 24)])
def test_band_logits_pick_the_keys_right_before_each_query(n, q_start, width):
    """Entry b of query q is the logit of key q-b, -inf before position 0; 1500 queries cross
    the 1024-query chunks; a head subset is the same rows."""
    torch.manual_seed(2)
    q, k = torch.randn(n, 6, 8), torch.randn(q_start + n, 2, 8)
    logits = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(3, dim=1)) * 0.3  # [H, n, T]
    pos = q_start + torch.arange(n)[:, None] - torch.arange(width)[None, :]  # [n, W] key of entry b
    want = logits.gather(-1, pos.clamp_min(0)[None].expand(6, -1, -1)).masked_fill(pos[None] < 0, float("-inf"))
    got = band_logits(q, k, q_start, 0.3, width)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    heads = torch.tensor([1, 4])
    assert torch.equal(band_logits(q, k, q_start, 0.3, width, heads), got[heads])


def test_decode_band_logits_are_each_request_s_band():
    """A decode step's band for all requests at once equals `band_logits` request by request
    (positions near 0 included: their missing keys are -inf)."""
    from dynsplit_sglang.kernels.dd_select import decode_band_logits

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(400, 2, 8, generator=g)
    lens = [3, 50, 120]
    rows = [torch.randperm(400, generator=g)[:n] for n in lens]
    slots = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    q = torch.randn(3, 6, 8, generator=g)
    heads = torch.tensor([0, 4, 5])
    got = decode_band_logits(q, keys, slots, torch.tensor(lens), 0.3, 24, heads)
    for k, (row, n) in enumerate(zip(rows, lens)):
        want = band_logits(q[k : k + 1], keys[row], n - 1, 0.3, 24, heads)  # [h, 1, W]
        torch.testing.assert_close(got[:, k], want[:, 0])
