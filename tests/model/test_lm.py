"""The LM for every architecture: causality, document isolation, loss, weight tying and init scales."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_hope.model.cms import parameter_levels

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
    """With a document starting at p, the logits from p on equal the second document run alone."""
    model = build(arch)
    tokens = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(2))
    doc = doc_starts(2, [[0, 23], [0, 37]])
    with torch.no_grad():
        packed = model(tokens, doc)
        for b, p in ((0, 23), (1, 37)):
            alone = model(tokens[b:b + 1, p:])
            torch.testing.assert_close(packed[b, p:], alone[0], rtol=1e-9, atol=1e-9)
            first = model(tokens[b:b + 1, :p])
            torch.testing.assert_close(packed[b, :p], first[0], rtol=1e-9, atol=1e-9)


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


def test_tied_head_and_init_scales(build, tiny):
    model = build("transformerpp", dtype=torch.float32)
    assert model.head.weight is model.embed.weight
    untied = build("transformerpp", "--model.tie_embeddings=false", "--model.d_model=256", "--model.n_layers=8",
                   "--model.ffn_hidden=1024", "--model.vocab_size=4096", dtype=torch.float32)
    assert untied.head.weight is not untied.embed.weight
    std = tiny("transformerpp").init_std
    block = untied.blocks[0]
    # residual-writing projections: std / sqrt(2 n_layers); others: std
    assert abs(block.attn.wo.weight.std().item() - std / math.sqrt(16)) < 0.1 * std / math.sqrt(16)
    assert abs(block.mlp.w_down.weight.std().item() - std / math.sqrt(16)) < 0.1 * std / math.sqrt(16)
    assert abs(block.attn.wq.weight.std().item() - std) < 0.05 * std
    assert abs(untied.head.weight.std().item() - std) < 0.05 * std
    assert torch.equal(block.attn_norm.weight, torch.ones(256))


def test_hope_cms_parameters_are_tagged(build, tiny):
    cfg = tiny("hope")
    model = build("hope")
    levels = parameter_levels(model)
    expected = {f"blocks.{i}.cms.levels.{l}.{n}": l for i in range(cfg.n_layers) for l in range(len(cfg.cms.levels))
                for n in ("norm.weight", "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight")}
    assert levels == expected
