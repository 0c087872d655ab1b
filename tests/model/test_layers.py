"""The short causal conv against a per-token loop, in one call and split over calls that carry its tail, and
against a per-lag reference with explicit document masks, gradients included."""
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


def lagged_conv(x: torch.Tensor, weight: torch.Tensor, doc_start: torch.Tensor | None,
                tail: torch.Tensor | None) -> torch.Tensor:
    """Reference with explicit document masks: y_t = sum_lag weight[:, -1 - lag] * x_{t - lag} * [t - lag in t's
    document], the tail's tokens (or zeros) before x and in the document of the tokens before x's first start."""
    B, T, C = x.shape
    width = weight.shape[1]
    before = tail if tail is not None else torch.zeros(B, width - 1, C, dtype=x.dtype)
    xp = torch.cat([before, x], 1)  # token t of x at t + width - 1
    doc = torch.zeros(B, T, dtype=torch.long)  # index of each token's document in its row, the tail's is 0
    if doc_start is not None:
        doc = torch.cumsum(doc_start.long(), 1)
    docp = torch.cat([torch.zeros(B, width - 1, dtype=torch.long), doc], 1)
    y = torch.zeros_like(x)
    for lag in range(width):
        same_doc = docp[:, width - 1 - lag:width - 1 - lag + T] == doc
        y = y + weight[:, width - 1 - lag] * xp[:, width - 1 - lag:width - 1 - lag + T] * same_doc[..., None]
    return y


@pytest.mark.parametrize("with_doc", [False, True])
@pytest.mark.parametrize("with_tail", [False, True])
@pytest.mark.parametrize("width", [2, 4])
def test_conv_and_gradients_equal_lagged_reference(width, with_tail, with_doc):
    """Output and gradients (input, tail and weight) against the reference, random document starts, fp64."""
    g = torch.Generator().manual_seed(10 * width + 2 * with_tail + with_doc)
    conv = CausalDepthwiseConv1d(5, width).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(3, 17, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(3, width - 1, 5, generator=g, dtype=torch.float64, requires_grad=True) if with_tail else None
    doc = torch.rand(3, 17, generator=g) < 0.3 if with_doc else None
    if doc is not None:
        doc[0, 0] = True  # a start on the first token; the other rows continue the tail's document, or not
        doc[1, 1] = True  # a start the first token's taps reach back over
    grad_out = torch.randn(3, 17, 5, generator=g, dtype=torch.float64)
    inputs = [x, conv.weight] + ([tail] if with_tail else [])
    out = conv(x, doc, tail)
    expected = lagged_conv(x, conv.weight, doc, tail)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
