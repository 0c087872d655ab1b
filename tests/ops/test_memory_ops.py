"""Chunk-parallel inner loop == token-by-token oracle: outputs, final states and every gradient."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from megatron_hope.ops.memory import MemoryOptions, memory_scan


def _inputs(kind, B, H, T, w, m, dtype, seed, resets):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=g)  # noqa: E731
    init = {"W": r(H, w, w) * 0.3} if kind == "linear" else {"A": r(H, w, m) * 0.3, "B": r(H, m, w) * 0.3}
    raw = dict(k=r(B, H, T, w), v=r(B, H, T, w), q=r(B, H, T, w), eta=r(B, H, T), alpha=r(B, H, T), beta=r(B, H, T))
    doc_start = (torch.rand(B, H, T, generator=g) < 0.12) if resets else None
    leaves = list(init.values()) + list(raw.values())
    for x in leaves:
        x.requires_grad_(True)
    return init, raw, doc_start, leaves


def _run(impl, opts, chunk, init, raw, doc_start):
    k = F.normalize(raw["k"], dim=-1)  # unit keys keep alpha I - eta k k^T a contraction
    eta = torch.sigmoid(raw["eta"]) * 0.2
    log_alpha = F.logsigmoid(raw["alpha"] + 3.0)
    log_beta = F.logsigmoid(raw["beta"]) if opts.momentum else None
    return memory_scan(init, k, raw["v"], raw["q"], eta, log_alpha, log_beta, doc_start, chunk, opts, impl=impl)


def _compare(opts, dtype, tol, seed, B=2, H=2, T=13, w=5, m=7, chunk=4, resets=True):
    results = []
    for impl in ("torch", "sequential"):
        init, raw, doc_start, leaves = _inputs(opts.kind, B, H, T, w, m, dtype, seed, resets)
        out, state = _run(impl, opts, chunk, init, raw, doc_start)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=dtype)).sum() + sum((s ** 2).sum() for s in state.values())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append((out, state, grads))
    (o1, s1, g1), (o2, s2, g2) = results

    def close(a, b, what):
        scale = b.abs().max().clamp_min(1e-12)
        err = ((a - b).abs().max() / scale).item()
        assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"

    close(o1, o2, "outputs")
    assert s1.keys() == s2.keys()
    for n in s1:
        close(s1[n], s2[n], f"final state {n}")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None) == (b is None), f"gradient {i}: present in only one form"
        if a is not None:
            close(a, b, f"gradient of leaf {i}")


CASES = [
    dict(kind=kind, momentum=mom, momentum_form=form, readout=ro, dgd=dgd)
    for kind, (mom, form), ro, dgd in itertools.product(
        ("linear", "mlp"), ((False, "hope"), (True, "hope"), (True, "titans")),
        ("after_write", "before_write", "chunk_start"), ("none", "first", "each"))
    if not (kind == "linear" and dgd == "each")
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_chunked_matches_sequential_fp64(case):
    opts = MemoryOptions(self_target=True, **case)
    _compare(opts, torch.float64, 1e-10, seed=hash(tuple(case.values())) % 1000)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("self_target", [False, True])
@pytest.mark.parametrize("differentiable", [True, False])
def test_targets_and_stop_grad(kind, self_target, differentiable):
    opts = MemoryOptions(kind=kind, self_target=self_target, differentiable=differentiable, activation="gelu")
    _compare(opts, torch.float64, 1e-10, seed=7)


@pytest.mark.parametrize("kind,dgd", [("linear", "first"), ("mlp", "first"), ("mlp", "each")])
def test_inner_gradient_clipping(kind, dgd):
    """Per-token clipping of each matrix's inner gradient: the chunked form clips e k^T through its factors, the
    oracle clips the autograd gradient; a small threshold makes every token's update clip."""
    opts = MemoryOptions(kind=kind, self_target=True, dgd=dgd, grad_clip=0.05)
    _compare(opts, torch.float64, 1e-10, seed=13)


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_and_chunk_sizes(seed):
    """Random shapes; chunk sizes that do and do not divide T (the last chunk is shorter)."""
    rnd = random.Random(seed)
    T = rnd.randint(5, 24)
    chunk = rnd.choice([1, 2, 3, 5, 8, T, T + 3])
    opts = MemoryOptions(kind=rnd.choice(["linear", "mlp"]), momentum=rnd.random() < 0.5,
                         dgd=rnd.choice(["none", "first"]), self_target=rnd.random() < 0.5)
    _compare(opts, torch.float64, 1e-10, seed=seed, B=rnd.randint(1, 3), H=rnd.randint(1, 3), T=T,
             w=rnd.randint(2, 6), m=rnd.randint(2, 9), chunk=chunk, resets=rnd.random() < 0.7)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fp32_relative(kind):
    opts = MemoryOptions(kind=kind, self_target=True)
    _compare(opts, torch.float32, 1e-5, seed=11, T=24, w=8, m=16, chunk=8)


def _starts(shape, rows: list[list[int]]) -> torch.Tensor:
    ds = torch.zeros(*shape, dtype=torch.bool).flatten(0, -2)
    for row, starts in zip(ds, rows):
        row[starts] = True
    return ds.view(shape)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_state_carries_across_sequence_shards(kind):
    """Scanning [0, 8) then [8, T) from the carried state == one scan, when position 8 is on every row's chunk
    grid (chunk 4: each row's last document start before 8 is a multiple of 4 away, or a document starts at 8);
    documents also start mid-chunk before and after the split."""
    opts = MemoryOptions(kind=kind, self_target=True)
    init, raw, _, _ = _inputs(kind, 2, 2, 16, 4, 6, torch.float64, 3, False)
    doc_start = _starts((2, 2, 16), [[0, 5, 8, 11], [0, 4, 13], [2, 4, 12], [0, 3, 4, 10]])
    with torch.no_grad():
        full, state_full = _run("torch", opts, 4, init, raw, doc_start)
        first = {n: t[..., :8, :] if t.dim() == 4 else t[..., :8] for n, t in raw.items()}
        second = {n: t[..., 8:, :] if t.dim() == 4 else t[..., 8:] for n, t in raw.items()}
        o1, s1 = _run("torch", opts, 4, init, first, doc_start[..., :8])
        k2 = F.normalize(second["k"], dim=-1)
        o2, s2 = memory_scan(init, k2, second["v"], second["q"], torch.sigmoid(second["eta"]) * 0.2,
                             F.logsigmoid(second["alpha"] + 3.0), F.logsigmoid(second["beta"]), doc_start[..., 8:],
                             4, opts, state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=-2), full, rtol=1e-12, atol=1e-12)
    for n in state_full:
        torch.testing.assert_close(s2[n], state_full[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "sequential"])
@pytest.mark.parametrize("kind,momentum_form,readout", [("linear", "hope", "after_write"), ("mlp", "hope", "before_write"),
                                                        ("mlp", "titans", "after_write"), ("linear", "titans", "chunk_start")])
def test_packed_document_computes_what_it_computes_alone(impl, kind, momentum_form, readout):
    """Packing invariance: the chunk grid restarts at every document start, so a document's read-outs and every
    gradient (its inputs, the memory init) are the same at each offset in a packed row and equal running it alone."""
    opts = MemoryOptions(kind=kind, self_target=True, momentum_form=momentum_form, readout=readout, grad_clip=0.5)
    chunk, n_doc = 4, 11
    init, doc, _, doc_leaves = _inputs(kind, 1, 2, n_doc, 3, 5, torch.float64, 21, False)
    weights = torch.linspace(-1, 1, n_doc * 3, dtype=torch.float64).view(n_doc, 3)

    def outputs_and_grads(offset: int | None):
        if offset is None:
            raw, ds = doc, None
        else:
            _, before, _, _ = _inputs(kind, 1, 2, offset, 3, 5, torch.float64, 22, False)
            _, after, _, _ = _inputs(kind, 1, 2, 6, 3, 5, torch.float64, 23, False)
            raw = {n: torch.cat([before[n].detach(), doc[n], after[n].detach()], dim=2) for n in doc}
            ds = _starts((1, 2, offset + n_doc + 6), [[0, offset, offset + n_doc]] * 2)
        out, _ = _run(impl, opts, chunk, init, raw, ds)
        out = out[..., (offset or 0):(offset or 0) + n_doc, :]
        return out, torch.autograd.grad((out * weights).sum(), doc_leaves)

    alone, grads_alone = outputs_and_grads(None)
    for offset in range(1, 2 * chunk + 1):
        packed, grads = outputs_and_grads(offset)
        torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12, msg=f"read-outs at offset {offset}")
        for i, (a, b) in enumerate(zip(grads, grads_alone)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient {i} at offset {offset}")


def test_low_precision_inputs_keep_fp32_state():
    opts = MemoryOptions(kind="mlp", self_target=True)
    init, raw, doc_start, _ = _inputs("mlp", 1, 2, 8, 4, 6, torch.float32, 2, True)
    with torch.no_grad():
        raw16 = {n: t.to(torch.bfloat16) for n, t in raw.items()}
        out, state = _run("torch", opts, 4, init, raw16, doc_start)
    assert out.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in state.values())
