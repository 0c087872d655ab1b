"""The LM for every architecture: causality, document isolation, loss, weight tying and init scales."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_hope.config import load
from megatron_hope.model.cms import parameter_levels
from megatron_hope.model.lm import HopeLM

ARCHS = ("hope", "titans", "transformerpp")
T = 64  # max_seq_len of the tiny presets; the memory chunk is 16


def doc_starts(B: int, starts: list[list[int]]) -> torch.Tensor:
    ds = torch.zeros(B, T, dtype=torch.bool)
    for b, row in enumerate(starts):
        ds[b, row] = True
    return ds


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("with_docs", [False, True], ids=["no_docs", "docs"])
def test_causal(build, arch, with_docs):
    """Changing tokens t+1.. leaves the logits up to t bit-identical, and does change later ones."""
    model = build(arch)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (2, T), generator=g)
    doc = doc_starts(2, [[0, 23], [0, 40, 41]]) if with_docs else None
    with torch.no_grad():
        base = model(tokens, doc)
        for t in (0, 15, 16, 30, T - 2):
            changed = tokens.clone()
            changed[:, t + 1:] = (tokens[:, t + 1:] + torch.randint(1, 512, (2, T - t - 1), generator=g)) % 512
            out = model(changed, doc)
            assert torch.equal(out[:, :t + 1], base[:, :t + 1]), f"logits up to {t} depend on later tokens"
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_document_isolation(build, arch):
    """A document's logits do not depend on the documents before it; a document starting on the memory chunk grid
    (multiples of memory.chunk_size = 16; the memories also cut a chunk at every document start) gives the logits
    of the document run alone, and the document before it those of its own run."""
    model = build(arch)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 512, (2, T), generator=g)
    doc = doc_starts(2, [[0, 23], [0, 32]])
    with torch.no_grad():
        packed = model(tokens, doc)
        changed = tokens.clone()
        changed[0, :23] = torch.randint(0, 512, (23,), generator=g)
        changed[1, :32] = torch.randint(0, 512, (32,), generator=g)
        out = model(changed, doc)
        # (the chunk [16, 32) that holds both documents of row 0 sums exact zeros in another order: 1e-15 noise)
        torch.testing.assert_close(out[0, 23:], packed[0, 23:], rtol=0, atol=1e-12)
        assert torch.equal(out[1, 32:], packed[1, 32:])
        assert not torch.allclose(out[0, :23], packed[0, :23]) and not torch.allclose(out[1, :32], packed[1, :32])
        for b, p in ((0, 23), (1, 32)):
            torch.testing.assert_close(packed[b, :p], model(tokens[b:b + 1, :p])[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(packed[1, 32:], model(tokens[1:, 32:])[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_mean_cross_entropy(build, arch):
    model = build(arch, dtype=torch.float32)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100  # ignored
    logits = model(tokens)
    loss = model(tokens, targets=targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref = F.log_softmax(logits.double(), -1)[:, :-1].gather(-1, targets[:, :-1, None]).mean().neg()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_head(build):
    model = build("transformerpp", dtype=torch.float32)
    assert model.head.weight is model.embed.weight
    untied = build("transformerpp", "--model.tie_embeddings=false", dtype=torch.float32)
    assert untied.head.weight is not untied.embed.weight
    assert not torch.equal(untied.head.weight, untied.embed.weight)


@pytest.mark.parametrize("arch, branches", [("hope", 4), ("titans", 2), ("transformerpp", 2)])
def test_init_scales(build, tiny, arch, branches):
    """Linear weights ~ N(0, init_std); residual-writing projections ~ N(0, init_std / sqrt(branches * n_layers));
    the mixers' own biases keep their values."""
    L = 6
    model = build(arch, "--model.d_model=256", f"--model.n_layers={L}", "--model.ffn_hidden=512",
                  "--model.cms.levels=[{hidden=512}, {hidden=512}, {hidden=512}]", dtype=torch.float32)
    std = tiny(arch).init_std
    out_std = std / math.sqrt(branches * L)

    def close(w: torch.Tensor, target: float) -> bool:
        return abs(w.std().item() - target) < 0.05 * target and abs(w.mean().item()) < 0.05 * target

    block = model.blocks[L - 1]
    assert close(model.embed.weight, std)
    if arch == "transformerpp":
        assert close(block.attn.wq.weight, std) and close(block.attn.wo.weight, out_std)
    else:
        assert close(block.mixer.in_proj.weight, std) and close(block.mixer.out_proj.weight, out_std)
    mlps = [lvl.mlp for lvl in block.cms.levels] if arch == "hope" else [block.mlp]
    for mlp in mlps:
        assert close(mlp.w_gate.weight, std) and close(mlp.w_up.weight, std) and close(mlp.w_down.weight, out_std)
    # init_weights redraws exactly the random parameters (embedding, linear weights, memory inits and gate
    # readouts); constants (norms, conv identities, bias fills) come back to the same values
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.init_weights()
    linear_weights = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for n, p in model.named_parameters():
        random = n in linear_weights or n == "embed.weight" or "_init." in n or n.endswith("_readout")
        assert torch.equal(p, before[n]) != random, n


def test_hope_cms_parameters_are_tagged(build, tiny):
    cfg = tiny("hope")
    model = build("hope")
    levels = parameter_levels(model)
    expected = {f"blocks.{i}.cms.levels.{l}.{n}": l for i in range(cfg.n_layers) for l in range(len(cfg.cms.levels))
                for n in ("norm.weight", "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight")}
    assert levels == expected


@pytest.mark.parametrize("arch", ["hope", "titans", "transformerpp"])
def test_meta_device_build_initialises_completely(arch):
    """Built on the meta device, materialised with to_empty and initialised by init_weights: deterministic
    parameters and buffers equal those of an ordinary build, random ones have their init scale."""
    cfg = load(f"configs/{arch}_tiny.toml").model
    torch.manual_seed(0)
    eager = HopeLM(cfg)
    with torch.device("meta"):
        meta = HopeLM(cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    eager_state = dict(eager.named_parameters()) | dict(eager.named_buffers())
    for name, t in list(meta.named_parameters()) + list(meta.named_buffers()):
        ref = eager_state[name]
        assert torch.isfinite(t).all(), name
        if ref.numel() > 1 and ref.std() > 0 and not name.endswith("bias"):
            assert 0.5 < (t.std() / ref.std()).item() < 2.0, name  # same init scale
        else:
            torch.testing.assert_close(t, ref, msg=name)  # constants: ones, identities, bias fills
