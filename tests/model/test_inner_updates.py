"""In-sequence CMS fast-weight updates (spec 1.4 proposal, first-order) against a naive per-sequence loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

T = 64
INNER = ("--model.cms.inner_updates=true", "--model.cms.inner_lr=0.5")  # a large step, so updates show


def data(B: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 512, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def reference(model, tokens: torch.Tensor, targets: torch.Tensor, doc_start: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence on its own, chunk by chunk, carrying the mixer states. The adapting levels read
    theta_0 + delta with delta a constant (first-order); after each chunk, the gradient of the chunk's summed loss
    w.r.t. the weights just read is added to the level's sum, and a level whose inner_chunk divides the chunk end
    takes the SGD step delta -= lr * sum. A document start (at a chunk start) restores theta_0 (delta = 0), drops
    the pending sums of every level and restarts the levels' schedules (tokens counted from the document start)."""
    cfg = model.cfg
    C, lr = cfg.cms.inner_chunk, cfg.cms.inner_lr
    period = {l: lvl.inner_chunk for l, lvl in enumerate(cfg.cms.levels) if lvl.inner_chunk}
    theta0 = {(i, l): dict(blk.cms.levels[l].mlp.named_parameters())
              for i, blk in enumerate(model.blocks) for l in period}
    rows, total = [], 0.0
    for b in range(tokens.shape[0]):
        delta = {key: {n: torch.zeros_like(p) for n, p in ps.items()} for key, ps in theta0.items()}
        acc = {key: {n: torch.zeros_like(p) for n, p in ps.items()} for key, ps in theta0.items()}
        states = [None] * len(model.blocks)
        row, doc_begin = [], 0
        for s in range(0, T, C):
            doc = None if doc_start is None else doc_start[b:b + 1, s:s + C]
            if doc is not None and doc[0, 0]:
                doc_begin = s
                delta = {key: {n: torch.zeros_like(d) for n, d in ds.items()} for key, ds in delta.items()}
                acc = {key: {n: torch.zeros_like(a) for n, a in sums.items()} for key, sums in acc.items()}
            weights = {key: {n: p + delta[key][n] for n, p in ps.items()} for key, ps in theta0.items()}
            x = model.embed(tokens[b:b + 1, s:s + C])
            for i, blk in enumerate(model.blocks):
                h, states[i] = blk.mixer(blk.mixer_norm(x), doc, states[i])
                x = x + h
                for l, lvl in enumerate(blk.cms.levels):
                    n = lvl.norm(x)
                    x = x + (functional_call(lvl.mlp, weights[(i, l)], (n,)) if l in period else lvl.mlp(n))
            logits = model.head(model.norm(x))[0]
            loss = F.cross_entropy(logits, targets[b, s:s + C], reduction="sum")
            row.append(logits)
            total = total + loss
            flat = [(key, n) for key in weights for n in weights[key]]
            grads = torch.autograd.grad(loss, [weights[key][n] for key, n in flat], retain_graph=True)
            for (key, n), g in zip(flat, grads):
                acc[key][n] += g
            for key in weights:
                if (s + C - doc_begin) % period[key[1]] == 0:
                    for n in delta[key]:
                        delta[key][n] = delta[key][n] - lr * acc[key][n]
                        acc[key][n] = torch.zeros_like(acc[key][n])
        rows.append(torch.cat(row))
    return torch.stack(rows), total / targets.numel()


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunk_covering_the_sequence_equals_no_updates(build):
    """inner_chunk >= T: no update happens inside the sequence, so logits, loss and gradients are those of the
    plain forward."""
    model = build("hope", *INNER, "--model.cms.levels=[{hidden=64, inner_chunk=64}, {hidden=48, inner_chunk=128}, "
                                  "{hidden=32}]")
    tokens, targets = data()
    logits, loss = model.forward_inner_updates(tokens, targets)
    torch.testing.assert_close(logits, model(tokens), rtol=1e-10, atol=1e-10)
    plain = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, plain, rtol=1e-10, atol=1e-10)
    assert model.cfg.cms.inner_updates
    g_inner = grads_of(model, model(tokens, targets=targets))
    model.cfg.cms.inner_updates = False
    g_plain = grads_of(model, model(tokens, targets=targets))
    for n in g_plain:
        torch.testing.assert_close(g_inner[n], g_plain[n], rtol=1e-9, atol=1e-12, msg=n)


def test_zero_inner_lr_equals_no_updates(build):
    """With small chunks but inner_lr = 0 the chunked run (mixer states carried) equals the plain forward."""
    model = build("hope", "--model.cms.inner_updates=true", "--model.cms.inner_lr=0")
    tokens, targets = data()
    logits, _ = model.forward_inner_updates(tokens, targets)
    torch.testing.assert_close(logits, model(tokens), rtol=1e-9, atol=1e-9)


def test_matches_naive_reference(build):
    model = build("hope", *INNER)
    tokens, targets = data()
    logits, loss = model.forward_inner_updates(tokens, targets)
    ref_logits, ref_loss = reference(model, tokens, targets)
    # the updates matter: the result differs from the plain forward after the first chunk
    assert not torch.allclose(logits[:, 16:], model(tokens)[:, 16:], atol=1e-3)
    torch.testing.assert_close(logits[:, :16], model(tokens)[:, :16], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    # outer gradient: first-order, through the reads, for every parameter
    g = grads_of(model, model(tokens, targets=targets))
    g_ref = grads_of(model, reference(model, tokens, targets)[1])
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-8, atol=1e-10, msg=n)


def test_causal_and_grad_free(build):
    model = build("hope", *INNER)
    tokens, targets = data(seed=1)
    base, _ = model.forward_inner_updates(tokens, targets)
    with torch.no_grad():  # inference (test-time learning) gives the same numbers without an outer graph
        torch.testing.assert_close(model.forward_inner_updates(tokens, targets)[0], base, rtol=0, atol=0)
    g = torch.Generator().manual_seed(5)
    for t in (10, 15, 16, 40):
        tok2, tgt2 = tokens.clone(), targets.clone()
        tok2[:, t + 1:] = torch.randint(0, 512, (2, T - t - 1), generator=g)
        tgt2[:, t:] = torch.randint(0, 512, (2, T - t), generator=g)  # target t is token t + 1
        out, _ = model.forward_inner_updates(tok2, tgt2)
        assert torch.equal(out[:, :t + 1], base[:, :t + 1].detach())


def test_document_starts_restore_the_meta_learned_weights(build):
    model = build("hope", *INNER)
    tokens, targets = data()
    doc = torch.zeros(2, T, dtype=torch.bool)
    doc[:, 0] = True
    doc[0, 32] = True
    logits, _ = model.forward_inner_updates(tokens, targets, doc)
    alone, _ = model.forward_inner_updates(tokens[:1, 32:], targets[:1, 32:])
    torch.testing.assert_close(logits[0, 32:], alone[0], rtol=1e-9, atol=1e-9)
    first, _ = model.forward_inner_updates(tokens[:, :32], targets[:, :32])
    torch.testing.assert_close(logits[:, :32], first, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("offset", [5, 20, 33])
def test_packed_document_adapts_as_it_would_alone(build, offset):
    """A document starting off the CMS chunk grid (16; level 1 steps every 32 tokens; memory chunk 16) computes
    what it computes alone: the mixers' chunk grids and the CMS levels' update schedules restart at its start.
    The document before it is unaffected by what follows."""
    model = build("hope", *INNER)
    randomize_mixers(model, seed=4)
    tokens, targets = data()
    doc = torch.zeros(2, T, dtype=torch.bool)
    doc[:, 0] = True
    doc[0, offset] = True
    logits, loss = model.forward_inner_updates(tokens, targets, doc)
    alone, _ = model.forward_inner_updates(tokens[:1, offset:], targets[:1, offset:])
    torch.testing.assert_close(logits[0, offset:], alone[0], rtol=1e-9, atol=1e-9)
    before, _ = model.forward_inner_updates(tokens[:1, :offset], targets[:1, :offset])
    torch.testing.assert_close(logits[0, :offset], before[0], rtol=1e-9, atol=1e-9)
    unpacked, _ = model.forward_inner_updates(tokens[1:], targets[1:])
    torch.testing.assert_close(logits[1], unpacked[0], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(loss)


def randomize_mixers(model, seed: int) -> None:
    """Random conv filters and random perturbations of the memory inits: the conv starts as the identity (a tap on
    the current token only), which would hide a conv that forgets the previous chunk's tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            mixer = blk.mixer
            for p in (mixer.conv.weight, *mixer.gen_init.values(), *mixer.mem_init.values()):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("conv_width", [2, 4])
def test_zero_inner_lr_equals_plain_forward_with_random_mixers(build, ratio, conv_width):
    """inner_lr = 0 with inner_chunk = ratio * memory.chunk_size: running the blocks once per CMS chunk must be the
    plain forward (logits and every gradient), so the mixers carry the conv's last inputs and the memory state
    across CMS chunks. A document start at a chunk start keeps the conv from reaching back across it."""
    C = 8
    levels = f"[{{hidden=64, inner_chunk={ratio * C}}}, {{hidden=48, inner_chunk={2 * ratio * C}}}, {{hidden=32}}]"
    model = build("hope", "--model.cms.inner_updates=true", "--model.cms.inner_lr=0",
                  f"--model.conv_width={conv_width}", f"--model.memory.chunk_size={C}", f"--model.cms.levels={levels}")
    randomize_mixers(model, seed=10 * ratio + conv_width)
    tokens, targets = data()
    doc = torch.zeros(2, T, dtype=torch.bool)
    doc[:, 0] = True
    doc[1, 32] = True
    logits, loss = model.forward_inner_updates(tokens, targets, doc)
    plain_logits = model(tokens, doc)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-10, atol=1e-10)
    g_inner = grads_of(model, loss)
    g_plain = grads_of(model, F.cross_entropy(plain_logits.flatten(0, 1), targets.flatten()))
    for n in g_plain:
        torch.testing.assert_close(g_inner[n], g_plain[n], rtol=1e-9, atol=1e-12, msg=n)


def test_document_start_inside_a_slower_levels_chunk(build):
    """A document starting at a multiple of the smallest inner_chunk (16) but not of level 1's (32): the restart
    must also drop level 1's pending gradient sum, which at the next step of level 1 would otherwise add the
    gradient of the previous document's chunk."""
    model = build("hope", *INNER)
    randomize_mixers(model, seed=3)
    tokens, targets = data()
    doc = torch.zeros(2, T, dtype=torch.bool)
    doc[:, 0] = True
    doc[0, 16] = True
    doc[1, 48] = True
    logits, loss = model.forward_inner_updates(tokens, targets, doc)
    ref_logits, ref_loss = reference(model, tokens, targets, doc)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    g = grads_of(model, loss)
    g_ref = grads_of(model, ref_loss)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-8, atol=1e-10, msg=n)
