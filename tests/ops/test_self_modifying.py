"""The self-modifying Titans mixer and the Titans baseline: chunked == sequential oracle (outputs, states and
every gradient), causality, document isolation, and the analytic FLOP count against torch's counter."""
import itertools

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from megatron_hope.config import MemoryConfig, ModelConfig
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer, mixer_forward_flops

MIXERS = {"smt": SelfModifyingTitans, "titans": TitansMixer}


def _mixer(name, seed=0, **memory):
    cfg = ModelConfig(d_model=24, n_heads=3, memory=MemoryConfig(**memory))
    torch.manual_seed(seed)
    return MIXERS[name](cfg).double()


def _doc_start(B, T, starts):
    ds = torch.zeros(B, T, dtype=torch.bool)
    ds[:, 0] = True
    for b, t in starts:
        ds[b, t] = True
    return ds


@pytest.mark.parametrize("name,kind,momentum,adaptive_q",
                         [(n, k, mo, aq) for n, k, mo, aq in itertools.product(MIXERS, ("mlp", "linear"), (True, False), (False, True))
                          if not (n == "titans" and aq)])
def test_mixer_chunked_matches_sequential(name, kind, momentum, adaptive_q):
    m = _mixer(name, kind=kind, momentum=momentum, adaptive_q=adaptive_q, chunk_size=4)
    x = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
    ds = _doc_start(2, 11, [(1, 6), (0, 3)])
    results = []
    for impl in ("torch", "sequential"):
        m.cfg.memory.impl = impl
        y, state = m(x, ds)
        loss = (y * torch.linspace(-1, 1, 24, dtype=torch.float64)).sum()
        loss = loss + sum(s.square().sum() for s in state.memory.values())
        results.append((y, state, torch.autograd.grad(loss, [x, *m.parameters()])))
    (y1, s1, g1), (y2, s2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    for n in s1.memory:
        torch.testing.assert_close(s1.memory[n], s2.memory[n], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1.conv, s2.conv, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_causal(name):
    m = _mixer(name, chunk_size=4)
    x = torch.randn(2, 14, 24, dtype=torch.float64)
    y, _ = m(x)
    for t in (0, 5, 8, 13):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
        y2, _ = m(x2)
        assert torch.equal(y[:, : t + 1], y2[:, : t + 1]), f"output at <= {t} changed"
        if t + 1 < 14:
            assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("impl", ["torch", "sequential"])
@pytest.mark.parametrize("name,kind", [("smt", "mlp"), ("smt", "linear"), ("titans", "mlp")])
def test_packed_document_computes_what_it_computes_alone(name, kind, impl):
    """Packing invariance of the mixers: a document's outputs and the gradients of its inputs and of every
    parameter are the same at each offset in a packed row (with documents before and after it) and equal running
    it alone: the chunk grid restarts at its start."""
    m = _mixer(name, kind=kind, chunk_size=4, impl=impl)
    n_doc = 10
    doc = torch.randn(1, n_doc, 24, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, n_doc * 24, dtype=torch.float64).view(1, n_doc, 24)

    def outputs_and_grads(offset: int):
        x = torch.cat([torch.randn(1, offset, 24, dtype=torch.float64), doc, torch.randn(1, 5, 24, dtype=torch.float64)], 1)
        y, _ = m(x, _doc_start(1, x.shape[1], [(0, offset), (0, offset + n_doc)]))
        y = y[:, offset:offset + n_doc]
        return y, torch.autograd.grad((y * weights).sum(), [doc, *m.parameters()], allow_unused=True)

    alone, grads_alone = outputs_and_grads(0)
    for offset in (1, 2, 3, 5, 7):
        packed, grads = outputs_and_grads(offset)
        torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12, msg=f"outputs at offset {offset}")
        for i, (a, b) in enumerate(zip(grads, grads_alone)):
            if b is None:
                assert a is None or not a.any()
                continue
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient {i} at offset {offset}")


@pytest.mark.parametrize("name,kind,differentiable,group", [("smt", "mlp", True, 1), ("smt", "linear", False, 2),
                                                           ("titans", "mlp", True, 3), ("titans", "linear", False, 1)])
def test_recompute_chunks_equals_saving_everything(name, kind, differentiable, group):
    """model.memory.recompute_chunks = n keeps the state every n chunks and recomputes them in backward: the
    outputs, final states and every gradient are those of the plain autograd path, bit for bit (19 tokens in
    chunks of 4: the last group is shorter and so is the last chunk; documents start inside chunks)."""
    x = torch.randn(2, 19, 24, dtype=torch.float64, requires_grad=True)
    ds = _doc_start(2, 19, [(0, 6), (1, 9), (1, 13)])
    results = []
    for recompute in (0, group):
        m = _mixer(name, kind=kind, chunk_size=4, differentiable_writes=differentiable, recompute_chunks=recompute)
        y, state = m(x, ds)
        loss = (y * torch.linspace(-1, 1, 24, dtype=torch.float64)).sum() + sum(s.square().sum() for s in state.memory.values())
        results.append((y, state.memory, torch.autograd.grad(loss, [x, *m.parameters()], allow_unused=True)))
    (y1, s1, g1), (y2, s2, g2) = results
    assert torch.equal(y1, y2) and all(torch.equal(s1[n], s2[n]) for n in s1)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name,kind,conv_width", [("smt", "mlp", 4), ("smt", "linear", 3), ("smt", "mlp", 2),
                                                    ("titans", "mlp", 4), ("titans", "linear", 2)])
def test_mixer_state_continues_across_calls(name, kind, conv_width):
    """Running [0, 8) then [8, 16) from the carried state == one call: outputs and final state, with random conv
    filters and memory inits. Row 0 starts a document at 6, inside the conv's reach of the split (the carry must
    not let tokens 8.. see 5), and at 9; row 1 at 2 and 11. The split is on every row's chunk grid (chunk 2)."""
    cfg = ModelConfig(d_model=24, n_heads=3, conv_width=conv_width, memory=MemoryConfig(kind=kind, chunk_size=2))
    torch.manual_seed(0)
    m = MIXERS[name](cfg).double()
    with torch.no_grad():
        for p in (m.conv.weight, *m.mem_init.values(), *getattr(m, "gen_init", {}).values()):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    ds = _doc_start(2, 16, [(0, 6), (0, 9), (1, 2), (1, 11)])
    y, s = m(x, ds)
    y1, s1 = m(x[:, :8], ds[:, :8])
    y2, s2 = m(x[:, 8:], ds[:, 8:], state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    leaves, leaves2 = tree_leaves(s), tree_leaves(s2)
    assert len(leaves) == len(leaves2)
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kind,readout,dgd,momentum", list(itertools.product(
    MIXERS, ("mlp", "linear"), ("after_write", "chunk_start"), ("first", "each"), (True, False))))
def test_flop_count_matches_profiler(name, kind, readout, dgd, momentum):
    cfg = ModelConfig(d_model=32, n_heads=2, memory=MemoryConfig(kind=kind, chunk_size=8, readout=readout,
                                                                 dgd=dgd, momentum=momentum))
    m = MIXERS[name](cfg)
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(2, 32, 32))
    counted = counter.get_total_flops() / (2 * 32)
    analytic = mixer_forward_flops(cfg, 32, self_modifying=name == "smt")
    assert abs(analytic - counted) / counted < 0.05, (analytic, counted)


def test_inner_loop_stays_fp32_under_autocast():
    """Under bf16 autocast only the projections run in bf16: the inner loop keeps fp32 states and matmuls."""
    cfg = ModelConfig(d_model=32, n_heads=2, memory=MemoryConfig(chunk_size=8))
    torch.manual_seed(0)
    m = SelfModifyingTitans(cfg)
    x = torch.randn(2, 24, 32)
    ref, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = m(x)
    assert y.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in state.memory.values())
    assert ((y.float() - ref).norm() / ref.norm()) < 3e-2


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_states_stay_bounded_on_long_correlated_inputs(kind):
    """Gradients at the stale chunk-start state compound across chunks; the per-token inner clipping keeps the
    memory states bounded over a long sequence of strongly correlated inputs at the largest learning rate."""
    cfg = ModelConfig(d_model=64, n_heads=4, memory=MemoryConfig(kind=kind, chunk_size=64, eta_max=0.5))
    torch.manual_seed(0)
    m = SelfModifyingTitans(cfg)
    x = 0.7 * torch.randn(1, 1, 64) + 0.7 * torch.randn(1, 1024, 64)
    with torch.no_grad():
        y, state = m(x)
    assert torch.isfinite(y).all()
    # additive updates of norm <= eta_max * grad_clip per token, retention <= 1, contraction of the DGD factor:
    # the states stay within a few hundred of their init
    assert max(s.abs().max().item() for s in state.memory.values()) < 1e3
