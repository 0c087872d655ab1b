"""The short causal conv against a per-token loop: in one call, and split over calls that carry its tail."""
from __future__ import annotations

import pytest
import torch

from megatron_hope.model.layers import CausalDepthwiseConv1d


def naive_conv(x: torch.Tensor, weight: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """y_t = sum_lag weight[:, -1 - lag] * x_{t - lag} over the lags that stay inside t's document."""
    B, T, _ = x.shape
    width = weight.shape[1]
    y = torch.zeros_like(x)
    for b in range(B):
        begin = 0
        for t in range(T):
            if doc_start[b, t]:
                begin = t
            for lag in range(min(width, t - begin + 1)):
                y[b, t] += weight[:, width - 1 - lag] * x[b, t - lag]
    return y


@pytest.mark.parametrize("width", [1, 2, 4])
def test_conv_split_over_calls_equals_one_call(width):
    """Pieces of 5, 1, 2 and 4 tokens (some shorter than the tail), document starts inside a piece, at a piece's
    first token and just before a split, within the conv's reach of it."""
    g = torch.Generator().manual_seed(width)
    conv = CausalDepthwiseConv1d(3, width).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    doc = torch.zeros(2, 12, dtype=torch.bool)
    doc[:, 0] = True
    doc[0, 4] = True  # last token of the first piece
    doc[0, 9] = True  # inside the last piece
    doc[1, 6] = True  # first token of the third piece
    expected = naive_conv(x, conv.weight.detach(), doc)
    torch.testing.assert_close(conv(x, doc), expected, rtol=0, atol=1e-12)
    outs, tail, s = [], None, 0
    for n in (5, 1, 2, 4):
        piece, piece_doc = x[:, s:s + n], doc[:, s:s + n]
        outs.append(conv(piece, piece_doc, tail))
        tail = conv.next_tail(piece, piece_doc, tail)
        assert tail.shape == (2, width - 1, 3)
        s += n
    torch.testing.assert_close(torch.cat(outs, 1), expected, rtol=0, atol=1e-12)
