"""The inner-loop conventions of hope_spec.md ("project decisions"), pinned by cases worked by hand.

Every case is tiny (width 1 or 2, 1-8 tokens, simple numbers) and its expected values are written out as the
arithmetic of the spec's equations, not computed with the project's ops; each runs through the token-by-token
oracle and the chunked form (and the self-modifying scan for the self-referential case). The conventions:

  inner loss ||M(k_t) - v_t||^2, gradient 2 (M k - v) k^T for a matrix memory (factor 2 kept);
  S_t = beta_t S_{t-1} + g_t,  M_t = M_{t-1} (alpha_t I - eta_t k_t k_t^T) - eta_t S_t   (Titans form as a switch:
  S_t = beta_t S_{t-1} - eta_t g_t, M_t = alpha_t M_{t-1} + S_t);
  g_t is taken at the chunk-start state, the DGD factor multiplies the running state M_{t-1};
  read-out after token t's write (switches: before the write, or at the chunk start = paper Eq. 90);
  each memory matrix's per-token gradient is rescaled to Frobenius norm <= grad_clip;
  a document start restores the init, zeroes the momentum and starts a new chunk.
"""
from __future__ import annotations

import math
from importlib.util import find_spec

import pytest
import torch

from megatron_hope.config import MemoryConfig, ModelConfig
from megatron_hope.model.titans import memory_options
from megatron_hope.ops.memory import MemoryOptions, memory_scan
from megatron_hope.ops.self_modifying import GateReadouts, self_modifying_scan

IMPLS = ("sequential", "torch")
# memory_scan's cases also run on the Triton kernels (under the interpreter on a CPU) when triton is installed
SCAN_IMPLS = IMPLS + (("triton",) if find_spec("triton") else ())
LINEAR = dict(kind="linear", momentum=False, dgd="none")


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def scan(opts: MemoryOptions, init: dict, k, v, q, eta, alpha, chunk: int, impl: str, beta=None, doc_start=None
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One sequence (leading dim 1) through memory_scan; gates as plain values (alpha and beta, not their logs)."""
    out, state = memory_scan(
        {n: t(w) for n, w in init.items()}, t(k)[None], t(v)[None], t(q)[None], t(eta)[None], t(alpha).log()[None],
        None if beta is None else t(beta).log()[None],
        None if doc_start is None else torch.tensor(doc_start)[None], chunk, opts, impl=impl)
    return out[0], {n: s[0] for n, s in state.items()}


def assert_exact(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=0, atol=1e-12)


def silu(x: float) -> float:
    return x / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- factor 2 of the L2 gradient

@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_l2_gradient_keeps_the_factor_two_linear(impl):
    # M_0 = 0, k = [1, 0], v = [0, 1]: g = 2 (M_0 k - v) k^T = 2 [[0, 0], [-1, 0]]; alpha = 1, eta = 0.25:
    # M_1 = M_0 - 0.25 g = [[0, 0], [0.5, 0]]; read at q = k: M_1 k = [0, 0.5] (0.25 without the factor 2)
    out, state = scan(MemoryOptions(**LINEAR), {"W": [[0.0, 0.0], [0.0, 0.0]]}, [[1.0, 0.0]], [[0.0, 1.0]],
                      [[1.0, 0.0]], [0.25], [1.0], chunk=1, impl=impl)
    assert_exact(state["W"], [[0.0, 0.0], [-0.25 * 2 * -1, 0.0]])
    assert_exact(out, [[0.0, 0.5]])


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_l2_gradient_keeps_the_factor_two_mlp(impl):
    # width 1, hidden 1: M(z) = z + a silu(b z), a_0 = b_0 = 1, k = 1, v = 0, eta = 0.25, alpha = 1, no DGD.
    # residual r = M(k) - v = 1 + silu(1) = 1 + s with s = sigmoid(1) = silu(1); silu'(1) = s (1 + (1 - s))
    # d/da ||r||^2 = 2 r silu(b k) = 2 (1 + s) s;  d/db = 2 r a silu'(b k) k = 2 (1 + s) s (2 - s)
    s = 1 / (1 + math.exp(-1))
    a1 = 1 - 0.25 * 2 * (1 + s) * s
    b1 = 1 - 0.25 * 2 * (1 + s) * s * (2 - s)
    opts = MemoryOptions(kind="mlp", momentum=False, dgd="none")
    out, state = scan(opts, {"A": [[1.0]], "B": [[1.0]]}, [[1.0]], [[0.0]], [[1.0]], [0.25], [1.0], chunk=1, impl=impl)
    assert_exact(state["A"], [[a1]])
    assert_exact(state["B"], [[b1]])
    assert_exact(out, [[1 + a1 * silu(b1)]])


# ----------------------------------------------------------------------------- momentum form and the Titans switch

# two tokens, chunk 1 (each gradient at the running state), M_0 = I, alpha = beta = 0.5, eta = 0.5 then 0.25
# (the two momentum forms only differ when eta varies):
#   k_1 = [1, 0], v_1 = [0, 1]: g_1 = 2 ([1, 0] - [0, 1]) k_1^T = [[2, 0], [-2, 0]]
MOMENTUM_CASE = dict(init={"W": [[1.0, 0.0], [0.0, 1.0]]}, k=[[1.0, 0.0], [0.0, 1.0]], v=[[0.0, 1.0], [1.0, 0.0]],
                     q=[[1.0, 0.0], [1.0, 0.0]], eta=[0.5, 0.25], alpha=[0.5, 0.5], beta=[0.5, 0.5], chunk=1)


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_hope_momentum_form(impl):
    # S_1 = g_1; M_1 = I (0.5 I - 0.5 k_1 k_1^T) - 0.5 S_1 = diag(0, 0.5) - [[1, 0], [-1, 0]] = [[-1, 0], [1, 0.5]]
    # k_2 = [0, 1], v_2 = [1, 0]: M_1 k_2 = [0, 0.5], g_2 = 2 [-1, 0.5] k_2^T = [[0, -2], [0, 1]]
    # S_2 = 0.5 S_1 + g_2 = [[1, -2], [-1, 1]]
    # M_2 = M_1 diag(0.5, 0.5 - 0.25) - 0.25 S_2 = [[-0.5, 0], [0.5, 0.125]] - [[0.25, -0.5], [-0.25, 0.25]]
    opts = MemoryOptions(kind="linear", momentum=True, momentum_form="hope", dgd="first")
    out, state = scan(opts, impl=impl, **MOMENTUM_CASE)
    assert_exact(state["S_W"], [[1.0, -2.0], [-1.0, 1.0]])
    assert_exact(state["W"], [[-0.5 - 0.25, 0.5], [0.5 + 0.25, 0.125 - 0.25]])
    assert_exact(out, [[-1.0, 1.0], [-0.5 - 0.25, 0.5 + 0.25]])  # M_t q_t, q = [1, 0]: first columns


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_titans_momentum_form_with_dgd(impl):
    # S_1 = -0.5 g_1 = [[-1, 0], [1, 0]]; M_1 = diag(0, 0.5) + S_1 = [[-1, 0], [1, 0.5]] (as above: S_0 = 0)
    # S_2 = 0.5 S_1 - 0.25 g_2 = [[-0.5, 0], [0.5, 0]] - [[0, -0.5], [0, 0.25]] = [[-0.5, 0.5], [0.5, -0.25]]
    # M_2 = M_1 diag(0.5, 0.25) + S_2 = [[-0.5, 0], [0.5, 0.125]] + S_2
    opts = MemoryOptions(kind="linear", momentum=True, momentum_form="titans", dgd="first")
    out, state = scan(opts, impl=impl, **MOMENTUM_CASE)
    assert_exact(state["S_W"], [[-0.5, 0.5], [0.5, -0.25]])
    assert_exact(state["W"], [[-0.5 - 0.5, 0.5], [0.5 + 0.5, 0.125 - 0.25]])
    assert_exact(out, [[-1.0, 1.0], [-1.0, 1.0]])


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_titans_baseline_switch(impl):
    """The Titans mixer's options (Titans section 3): S_t = beta S_{t-1} - eta g_t, M_t = alpha M_{t-1} + S_t,
    no DGD factor, targets v_t."""
    opts = memory_options(ModelConfig(memory=MemoryConfig(kind="linear", grad_clip=0.0)), self_modifying=False)
    # S_1 = -0.5 g_1 = [[-1, 0], [1, 0]]; M_1 = 0.5 I + S_1 = [[-0.5, 0], [1, 0.5]]
    # M_1 k_2 = [0, 0.5]: g_2 = [[0, -2], [0, 1]] as above; S_2 = [[-0.5, 0.5], [0.5, -0.25]]
    # M_2 = 0.5 M_1 + S_2 = [[-0.25, 0], [0.5, 0.25]] + S_2
    out, state = scan(opts, impl=impl, **MOMENTUM_CASE)
    assert_exact(state["S_W"], [[-0.5, 0.5], [0.5, -0.25]])
    assert_exact(state["W"], [[-0.25 - 0.5, 0.5], [0.5 + 0.5, 0.25 - 0.25]])
    assert_exact(out, [[-0.5, 1.0], [-0.75, 1.0]])


# ----------------------------------------------------------------------------- read-out rule

# M_0 = I, alpha = 0.5, eta = 0.25, no momentum, no DGD, chunk 2, three tokens, q = [1, 2] throughout
#   token 1 (gradient at M_0): k = [1, 0], v = [0, 1]: g_1 = [[2, 0], [-2, 0]]
#                              M_1 = 0.5 I - 0.25 g_1 = [[0, 0], [0.5, 0.5]]
#   token 2 (gradient at M_0): k = [0, 1], v = [1, 0]: g_2 = 2 ([0, 1] - [1, 0]) k^T = [[0, -2], [0, 2]]
#                              M_2 = 0.5 M_1 - 0.25 g_2 = [[0, 0.5], [0.25, -0.25]]
#   token 3 (new chunk, gradient at M_2): k = [1, 0], v = [0, 0]: M_2 k = [0, 0.25], g_3 = [[0, 0], [0.5, 0]]
#                              M_3 = 0.5 M_2 - 0.25 g_3 = [[0, 0.25], [0, -0.125]]
READ_CASE = dict(init={"W": [[1.0, 0.0], [0.0, 1.0]]}, k=[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                 v=[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], q=[[1.0, 2.0]] * 3, eta=[0.25] * 3, alpha=[0.5] * 3, chunk=2)
M0q, M1q, M2q, M3q = [1.0, 2.0], [0.0, 0.5 + 1.0], [1.0, 0.25 - 0.5], [0.5, -0.25]
READS = {
    "after_write": [M1q, M2q, M3q],  # o_t = M_t q_t (the dual form)
    "before_write": [M0q, M1q, M2q],  # o_t = M_{t-1} q_t
    "chunk_start": [M0q, M0q, M2q],  # o_t = M_c(t) q_t, c(t) the end of the previous chunk (paper Eq. 90)
}


@pytest.mark.parametrize("impl", SCAN_IMPLS)
@pytest.mark.parametrize("readout", READS)
def test_readout_rule(impl, readout):
    out, state = scan(MemoryOptions(**{**LINEAR, "readout": readout}), impl=impl, **READ_CASE)
    assert_exact(state["W"], [[0.0, 0.25], [0.0, -0.125]])
    assert_exact(out, READS[readout])


def test_readout_default_is_after_write():
    assert MemoryOptions().readout == MemoryConfig().readout == "after_write"


# ----------------------------------------------------------------------------- DGD factor and gradient point

# M_0 = I, alpha = 1, eta = 0.25, no momentum, k_1 = k_2 = [1, 0], v_1 = v_2 = [0, 1]
#   token 1: g_1 = [[2, 0], [-2, 0]]; M_1 = M_0 (I - 0.25 k k^T) - 0.25 g_1 = diag(0.75, 1) - [[0.5, 0], [-0.5, 0]]
#          = [[0.25, 0], [0.5, 1]]
#   token 2: factor on the running state: M_1 (I - 0.25 k k^T) = [[0.1875, 0], [0.375, 1]]
DGD_CASE = dict(init={"W": [[1.0, 0.0], [0.0, 1.0]]}, k=[[1.0, 0.0]] * 2, v=[[0.0, 1.0]] * 2, q=[[1.0, 0.0]] * 2,
                eta=[0.25] * 2, alpha=[1.0] * 2)


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_dgd_factor_on_running_state_gradient_at_chunk_start(impl):
    # chunk 2: g_2 is taken at the chunk start M_0, so g_2 = g_1; M_2 = [[0.1875, 0], [0.375, 1]] - 0.25 g_1
    opts = MemoryOptions(kind="linear", momentum=False, dgd="first")
    out, state = scan(opts, chunk=2, impl=impl, **DGD_CASE)
    assert_exact(state["W"], [[0.1875 - 0.5, 0.0], [0.375 + 0.5, 1.0]])
    assert_exact(out, [[0.25, 0.5], [0.1875 - 0.5, 0.375 + 0.5]])


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_dgd_with_chunk_one_takes_the_gradient_at_the_running_state(impl):
    # chunk 1: g_2 at M_1: M_1 k = [0.25, 0.5], g_2 = 2 [0.25, -0.5] k^T = [[0.5, 0], [-1, 0]]
    opts = MemoryOptions(kind="linear", momentum=False, dgd="first")
    out, state = scan(opts, chunk=1, impl=impl, **DGD_CASE)
    assert_exact(state["W"], [[0.1875 - 0.125, 0.0], [0.375 + 0.25, 1.0]])
    assert_exact(out, [[0.25, 0.5], [0.0625, 0.625]])


# ----------------------------------------------------------------------------- inner-gradient clip

@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_gradient_clip_is_per_token(impl):
    # M_0 = 0, grad_clip = 1, alpha = 1, eta = 0.25, one chunk of two tokens (gradients at M_0 = 0):
    #   g_1 = 2 (0 - [0, 1]) [1, 0]^T = [[0, 0], [-2, 0]], norm 2 -> scaled to norm 1: [[0, 0], [-1, 0]]
    #   g_2 = 2 (0 - [0.25, 0]) [0, 1]^T = [[0, -0.5], [0, 0]], norm 0.5 -> unchanged
    # (clipping the chunk's sum, of norm sqrt(4.25), would scale both)
    opts = MemoryOptions(**LINEAR, grad_clip=1.0)
    out, state = scan(opts, {"W": [[0.0, 0.0], [0.0, 0.0]]}, [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.25, 0.0]],
                      [[1.0, 1.0]] * 2, [0.25] * 2, [1.0] * 2, chunk=2, impl=impl)
    assert_exact(state["W"], [[0.0, 0.25 * 0.5], [0.25 * 1, 0.0]])
    assert_exact(out, [[0.0, 0.25], [0.125, 0.25]])


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_gradient_clip_is_per_matrix(impl):
    # the MLP case of the factor-2 test with grad_clip = 3: d/da = 2 (1 + s) s = 2.53... stays,
    # d/db = 2 (1 + s) s (2 - s) = 3.21... is scaled to 3 (one norm over both matrices, 4.1..., would scale both)
    s = 1 / (1 + math.exp(-1))
    grad_a, grad_b = 2 * (1 + s) * s, 2 * (1 + s) * s * (2 - s)
    assert grad_a < 3 < grad_b
    a1, b1 = 1 - 0.25 * grad_a, 1 - 0.25 * 3
    opts = MemoryOptions(kind="mlp", momentum=False, dgd="none", grad_clip=3.0)
    out, state = scan(opts, {"A": [[1.0]], "B": [[1.0]]}, [[1.0]], [[0.0]], [[1.0]], [0.25], [1.0], chunk=1, impl=impl)
    assert_exact(state["A"], [[a1]])
    assert_exact(state["B"], [[b1]])
    assert_exact(out, [[1 + a1 * silu(b1)]])


# ----------------------------------------------------------------------------- document start

# chunk 4, eight tokens, a document starting at token 6 (inside the second chunk, whose start state is not the
# init); momentum (hope form) with beta = 0.5, DGD, alpha = 1, eta = 0.25, M_0 = I. The second document,
# tokens 6 and 7 with k = [1, 0], v = [0, 1], q = [1, 1], starts from M_0 with S = 0 and its own chunk:
#   token 6: g = [[2, 0], [-2, 0]] (at M_0); S_6 = g; M_6 = diag(0.75, 1) - 0.25 g = [[0.25, 0], [0.5, 1]]
#   token 7: g at M_0 again (chunk start = document start); S_7 = 0.5 S_6 + g = [[3, 0], [-3, 0]]
#            M_7 = M_6 diag(0.75, 1) - 0.25 S_7 = [[0.1875 - 0.75, 0], [0.375 + 0.75, 1]]
DOC_CASE = dict(init={"W": [[1.0, 0.0], [0.0, 1.0]]},
                k=[[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
                v=[[1.0, 1.0], [2.0, -1.0], [0.5, 0.0], [-1.0, 1.0], [1.0, 2.0], [0.0, 3.0], [0.0, 1.0], [0.0, 1.0]],
                q=[[1.0, 1.0]] * 8, eta=[0.25] * 8, alpha=[1.0] * 8, beta=[0.5] * 8, chunk=4)
M6q, M7q = [0.25, 1.5], [0.1875 - 0.75, 0.375 + 0.75 + 1]
DOC_READS = {"after_write": [M6q, M7q], "before_write": [[1.0, 1.0], M6q], "chunk_start": [[1.0, 1.0], [1.0, 1.0]]}


@pytest.mark.parametrize("impl", SCAN_IMPLS)
@pytest.mark.parametrize("readout", DOC_READS)
def test_document_start_restores_init_zeroes_momentum_starts_a_chunk(impl, readout):
    opts = MemoryOptions(kind="linear", momentum=True, dgd="first", readout=readout)
    doc = [True] + [False] * 5 + [True, False]
    out, state = scan(opts, impl=impl, doc_start=doc, **DOC_CASE)
    assert_exact(out[6:], DOC_READS[readout])
    assert_exact(state["W"], [[0.1875 - 0.75, 0.0], [0.375 + 0.75, 1.0]])
    assert_exact(state["S_W"], [[3.0, 0.0], [-3.0, 0.0]])
    # the first document leaves a state and a momentum that would change these numbers
    carried, _ = scan(opts, impl=impl, doc_start=[True] + [False] * 7, **DOC_CASE)
    assert not torch.allclose(carried[6:], out[6:])


# ----------------------------------------------------------------------------- self-modifying scan

# One head, width 1, linear memories M_k, M_v, M_eta, M_alpha (the generators) and M_mem, all starting at 1.
# eta and alpha readouts are zero with zero biases: eta = eta_max sigmoid(0) = 0.25, alpha = sigmoid(0) = 0.5.
# Every memory regresses its own image of v: g = 2 (W_c k - W_c v) k, and W_t = W_{t-1} (alpha - eta k^2) - eta g.
#   token 1: k = normalize(W_k x^k) = normalize(1) = 1, v = W_v x^v = 0: every W_1 = 1 (0.5 - 0.25) - 0.25 * 2 = -0.25
#   chunk 1, token 2 (generators at W_1): k = normalize(-0.25) = -1, v = W_v,1 * 1 = -0.25,
#            g = 2 W_1 (-1 + 0.25)(-1) = 1.5 W_1; W_2 = W_1 (0.5 - 0.25) - 0.25 * 1.5 W_1 = -0.125 W_1 = 0.03125
#   chunk 2, token 2 (generators and gradient at W_0): k = 1, v = 1, g = 0; W_2 = W_1 (0.5 - 0.25) = -0.0625
SMT_READS = {1: [-0.25, -0.125 * -0.25], 2: [-0.25, 0.25 * -0.25]}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", SMT_READS)
def test_self_modifying_scan_by_hand(impl, chunk):
    x_k, x_v, x_g = [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]
    gen_inputs = t([x_k, x_v, x_g, x_g]).view(1, 1, 4, 2, 1)  # (B, H, G, T, w): k, v, eta, alpha inputs
    q = t([1.0, 1.0]).view(1, 1, 2, 1)
    zeros = torch.zeros(1, 1, dtype=torch.float64)
    readouts = GateReadouts(zeros, zeros[0], zeros, zeros[0], eta_max=0.5)
    opts = MemoryOptions(kind="linear", momentum=False, dgd="first", self_target=True)
    out, state = self_modifying_scan(gen_inputs, q, None, {"W": torch.ones(1, 4, 1, 1, dtype=torch.float64)},
                                     {"W": torch.ones(1, 1, 1, 1, dtype=torch.float64)}, readouts, None, chunk, opts,
                                     impl=impl)
    assert_exact(out.flatten(), SMT_READS[chunk])
    assert_exact(state["W"].flatten(), [SMT_READS[chunk][1]] * 5)  # the four generators and M_mem alike
