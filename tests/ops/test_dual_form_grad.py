"""The hand-written backward of the dual-form writes (ops/dual_form_grad.py): against finite differences
(gradcheck, every input taken as independent), and against autograd through the same math on whole scans."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from megatron_hope.ops.chunk_algebra import ChunkCoefficients
from megatron_hope.ops.dual_form_grad import dual_form_write
from megatron_hope.ops.memory import MemoryOptions, memory_scan

D = torch.float64


def _coefficients(lead: tuple[int, ...], L: int, momentum: bool, sigma: float, g: torch.Generator) -> list:
    """Random, independent coefficient tensors (the op is differentiated in each of them separately)."""
    r = lambda *s: torch.randn(*lead, *s, dtype=D, generator=g).requires_grad_()  # noqa: E731
    tok, pair = (lambda: r(L)), (lambda: r(L, L) * 0.3)
    mom = (tok(), tok(), tok(), pair()) if momentum else (None, None, None, None)  # c, cp, mom_c, mom_rows
    return [tok(), tok(), pair(), pair(), pair(), pair(), mom[0], mom[1], sigma, mom[2], mom[3], tok()]


@pytest.mark.parametrize("dgd,momentum,readout,stack,last", [
    (True, True, "after_write", False, False), (True, False, "before_write", True, True),
    (False, True, "before_write", True, False), (True, True, "chunk_start", True, True),
    (False, False, "after_write", False, True), (True, True, "after_write", True, True)])
def test_gradcheck_against_finite_differences(dgd, momentum, readout, stack, last):
    """A stack of 3 memories sharing keys and coefficients (read: the last one), or one memory; the state after
    the chunk's end or after a per-row token `last`."""
    g = torch.Generator().manual_seed(0)
    B, M, L, a, b = 2, 3 if stack else 1, 4, 3, 2
    r = lambda *s: torch.randn(*s, dtype=D, generator=g).requires_grad_()  # noqa: E731
    W_c, E, KW = r(B, M, b, a), r(B, M, L, b), r(B, M, L, b)
    S_c = r(B, M, b, a) if momentum else None
    K, Z = r(B, 1, L, a), r(B, 1, L, a)
    coef = _coefficients((B, 1), L, momentum, -1.0, g)
    last_index = torch.tensor([[1], [3]]) if last else None

    def op(W_c, S_c, K, E, KW, Z, *c):
        coefs = ChunkCoefficients(*c[:8], -1.0, *c[8:])
        W, S, out = dual_form_write(coefs, W_c, S_c, K, E, KW, dgd, True, last_index, Z, readout, -1 if stack else None)
        return tuple(t for t in (W, S, out) if t is not None)

    tensors = [t for i, t in enumerate(coef) if i != 8]
    assert torch.autograd.gradcheck(op, (W_c, S_c, K, E, KW, Z, *tensors), atol=1e-8, rtol=1e-6)


CASES = [dict(kind=kind, momentum=mom, momentum_form=form, readout=ro, dgd=dgd, differentiable=diff, grad_clip=clip)
         for kind, (mom, form), ro, dgd, diff, clip in itertools.product(
             ("linear", "mlp"), ((False, "hope"), (True, "hope"), (True, "titans")),
             ("after_write", "before_write", "chunk_start"), ("none", "first", "each"), (True, False), (0.0, 0.3))
         if not (kind == "linear" and dgd == "each")]


@pytest.mark.parametrize("case", CASES[::5], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_scan_gradients_equal_autograd_through_the_same_math(case):
    """memory_scan with the hand-written backward == with autograd through MatrixWrite: outputs, final states and
    every gradient (fp64, 1e-10), with documents starting inside chunks (laid out with pads, states taken
    before the pads of the rows' last documents)."""
    results = []
    for backward in ("manual", "autograd"):
        g = torch.Generator().manual_seed(5)
        r = lambda *s: torch.randn(*s, dtype=D, generator=g).requires_grad_()  # noqa: E731
        H, T, w, m = 2, 15, 3, 4
        init = {"W": r(H, w, w)} if case["kind"] == "linear" else {"A": r(H, w, m), "B": r(H, m, w)}
        k, v, q, eta, alpha, beta = r(2, H, T, w), r(2, H, T, w), r(2, H, T, w), r(2, H, T), r(2, H, T), r(2, H, T)
        doc_start = torch.zeros(2, H, T, dtype=torch.bool)
        doc_start[0, :, 6] = doc_start[1, :, 3] = doc_start[1, :, 11] = True
        opts = MemoryOptions(self_target=True, write_backward=backward, **case)
        out, state = memory_scan(init, F.normalize(k, dim=-1), v, q, torch.sigmoid(eta) * 0.3, F.logsigmoid(alpha + 2),
                                 F.logsigmoid(beta) if opts.momentum else None, doc_start, 4, opts)
        loss = (out * torch.linspace(-1, 1, w, dtype=D)).sum() + sum((s * s.detach()).sum() for s in state.values())
        leaves = [*init.values(), k, v, q, eta, alpha, beta]
        results.append((out, state, torch.autograd.grad(loss, leaves, allow_unused=True)))
    (o1, s1, g1), (o2, s2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    for n in s1:
        torch.testing.assert_close(s1[n], s2[n], rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None) == (b is None)
        if a is not None:  # relative to the gradient's scale: terms that cancel leave round-off, not zeros
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
            assert err < 1e-10, f"gradient of leaf {i}: relative error {err:.2e}"
