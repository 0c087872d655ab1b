"""The inner loop on CUDA: the chunked form on the GPU against the fp64 oracle on the CPU, and a bf16
mixer step keeping fp32 states. Skipped where no GPU is present."""
import pytest
import torch
import torch.nn.functional as F

from megatron_hope.config import MemoryConfig, ModelConfig
from megatron_hope.model.titans import SelfModifyingTitans
from megatron_hope.ops.memory import MemoryOptions, memory_scan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cuda_chunked_matches_cpu_oracle(kind):
    g = torch.Generator().manual_seed(0)
    B, H, T, w, m = 2, 4, 40, 16, 32
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    init = {"W": r(H, w, w) * 0.3} if kind == "linear" else {"A": r(H, w, m) * 0.3, "B": r(H, m, w) * 0.3}
    k, v, q = F.normalize(r(B, H, T, w), dim=-1), r(B, H, T, w), r(B, H, T, w)
    eta, la, lb = torch.sigmoid(r(B, H, T)) * 0.2, F.logsigmoid(r(B, H, T) + 3), F.logsigmoid(r(B, H, T))
    ds = torch.rand(B, H, T, generator=g) < 0.1
    opts = MemoryOptions(kind=kind, self_target=True)
    ref, ref_state = memory_scan(init, k, v, q, eta, la, lb, ds, 8, opts, impl="sequential")
    cuda = lambda t: t.float().cuda()  # noqa: E731
    out, state = memory_scan({n: cuda(t) for n, t in init.items()}, cuda(k), cuda(v), cuda(q), cuda(eta), cuda(la),
                             cuda(lb), ds.cuda(), 8, opts, impl="torch")
    assert ((out.double().cpu() - ref).abs().max() / ref.abs().max()) < 1e-5
    for n in ref_state:
        assert ((state[n].double().cpu() - ref_state[n]).abs().max() / ref_state[n].abs().max()) < 1e-5


def test_cuda_bf16_mixer_step():
    cfg = ModelConfig(d_model=128, n_heads=4, memory=MemoryConfig(chunk_size=16))
    torch.manual_seed(0)
    mixer = SelfModifyingTitans(cfg).cuda()
    x = torch.randn(2, 64, 128, device="cuda")
    ref, _ = mixer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, state = mixer(x)
    y.float().square().mean().backward()
    assert all(s.dtype == torch.float32 for s in state.memory.values())
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in mixer.parameters())
    # only the projections around the fp32 inner loop run in bf16
    assert ((y.float() - ref).norm() / ref.norm()) < 3e-2
