"""model.compile: each block traces into one graph, compiling keeps every name, and the compiled model computes
what the eager one does."""
from __future__ import annotations

import pytest
import torch

from megatron_hope.model.blocks import BLOCKS
from megatron_hope.model.lm import HopeLM
from megatron_hope.parallel.compile import apply_compile
from megatron_hope.parallel.recompute import apply_recompute

SMALL = ("--model.d_model=32", "--model.n_heads=2", "--model.memory.chunk_size=8")
B, T = 2, 32


@pytest.mark.parametrize("arch", ["hope", "titans"])
def test_block_is_one_graph(tiny, arch):
    """Dynamo traces a block's forward whole: one graph, no graph break (tracing only, nothing is compiled)."""
    torch.manual_seed(0)
    block = BLOCKS[arch](tiny(arch, *SMALL))
    torch._dynamo.reset()
    out = torch._dynamo.explain(block)(torch.randn(B, T, 32), None)
    assert (out.graph_count, out.graph_break_count) == (1, 0), [r.reason for r in out.break_reasons]


@pytest.mark.parametrize("granularity", ["none", "full"])
def test_compile_keeps_names(tiny, granularity):
    """Parameter and state-dict names (CMS levels by name, checkpoint keys) are those of the eager model."""
    eager = apply_recompute(HopeLM(tiny("hope", *SMALL)), granularity)
    compiled = apply_compile(apply_recompute(HopeLM(tiny("hope", *SMALL)), granularity))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_compile_is_not_part_of_the_model(tiny):
    """A checkpoint's model equals this run's whether or not either compiles, so resuming may switch it."""
    assert tiny("hope", "--model.compile=true") == tiny("hope")


def test_compiled_loss_and_grads_match_eager(tiny):
    # aot_eager (dynamo + AOTAutograd, no inductor codegen): inductor's cold compile of this model takes ~3 min
    # on a 2-core CPU, too slow for a unit test
    torch.manual_seed(0)
    eager = HopeLM(tiny("hope", *SMALL))
    compiled = HopeLM(tiny("hope", *SMALL))
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled, backend="aot_eager")
    torch._dynamo.reset()
    tokens = torch.randint(0, 512, (B, T + 1), generator=torch.Generator().manual_seed(1))
    losses = [m(tokens[:, :-1], targets=tokens[:, 1:]) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_packed_documents_reuse_the_compiled_graphs(tiny):
    """Documents starting inside chunks are laid out to a length of T + chunk * 2^k: another packing in the same
    bucket runs on the graphs already compiled (dynamo only, backend "eager"), with the eager block's outputs."""
    torch.manual_seed(0)
    block = BLOCKS["hope"](tiny("hope", *SMALL))
    compiled = BLOCKS["hope"](tiny("hope", *SMALL))
    compiled.load_state_dict(block.state_dict())
    compiled.compile(backend="eager")
    torch._dynamo.reset()
    x = torch.randn(B, T, 32)

    def run(starts: list[int]) -> None:
        doc_start = torch.zeros(B, T, dtype=torch.bool)
        doc_start[:, 0] = True
        doc_start[0, starts] = True
        torch.testing.assert_close(compiled(x, doc_start)[0], block(x, doc_start)[0], rtol=1e-5, atol=1e-6)

    run([5])  # 3 pads: the layout has T + 8 tokens
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run([2, 9])  # 6 + 1 pads: T + 8 again
    run([13])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
