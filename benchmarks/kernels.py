"""The Triton kernels (megatron_hope/ops/triton/) against the PyTorch forms of the same op.

- ops: aten ops dispatched by one forward + backward of the Titans mixer (linear and MLP memory; per layer) and of
  HOPE's self-modifying mixer (per memory chunk), with the memories on the kernels (`model.memory.impl =
  "triton"`) and on the chunk-parallel PyTorch form, at each --op-seq-lens; kernel launches counted in (the work
  Triton's interpreter does inside a launch on a CPU is not).
- errors: the kernels' outputs and gradients against the token-by-token oracle in fp64 and fp32 (max relative).
- time (CUDA only; under the interpreter a kernel takes seconds): each memory's scan forward + backward at each
  --seq-lens, the kernels, the eager PyTorch form and the compiled PyTorch form taking turns.

    python -m benchmarks.kernels [--device cuda --seq-lens 1024 4096 16384 --heads 16 --batch 4 --head-dim 64]

On a CPU set TRITON_INTERPRET=1 (the benchmark does when no GPU is present). Prints `key: value` lines.
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # the interpreter is chosen when a kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

from benchmarks.common import emit, interleaved_median_seconds  # noqa: E402
from benchmarks.mixer import OpCounter, forward  # noqa: E402
from megatron_hope.config import MemoryConfig, ModelConfig  # noqa: E402
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer  # noqa: E402
from megatron_hope.ops.memory import MemoryOptions, memory_scan  # noqa: E402
from megatron_hope.ops.triton import generators, linear_memory, mlp_memory  # noqa: E402

KINDS = ("linear", "mlp")


def titans_options(kind: str) -> MemoryOptions:
    """The Titans mixer's memory options (model/titans.memory_options at the defaults)."""
    return MemoryOptions(kind=kind, momentum_form="titans", dgd="none", grad_clip=1.0)


class LaunchCounter:
    """Counts the kernels' launches and hides what a launch dispatches (the interpreter's own tensor work) from an
    active OpCounter, by wrapping the kernel objects of ops/triton/ while in use."""

    KERNELS = [(module, name) for module in (linear_memory, mlp_memory, generators)
               for name in ("_forward_kernel", "_backward_kernel")]

    def __init__(self) -> None:
        self.launches = 0

    def __enter__(self) -> "LaunchCounter":
        self.kernels = [(module, name, getattr(module, name)) for module, name in self.KERNELS]
        for module, name, kernel in self.kernels:
            setattr(module, name, _Counted(kernel, self))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, kernel in self.kernels:
            setattr(module, name, kernel)


class _Counted:
    def __init__(self, kernel, counter: LaunchCounter) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.launches += 1
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)
        return launch


def titans_mixer(kind: str, d_model: int, heads: int, chunk: int, seq_len: int, impl: str, device) -> TitansMixer:
    cfg = ModelConfig(arch="titans", d_model=d_model, n_heads=heads, n_layers=1, max_seq_len=seq_len,
                      memory=MemoryConfig(kind=kind, chunk_size=chunk, impl=impl))
    cfg.validate()
    torch.manual_seed(0)
    return TitansMixer(cfg).to(device)


def count_ops(layer, x) -> tuple[int, int]:
    """(aten ops + kernel launches, kernel launches) of one forward + backward, after an uncounted warm-up."""
    forward(layer, x).sum().backward()  # warm-up (and, on a GPU, compile)
    with LaunchCounter() as launches, OpCounter() as ops:
        torch.autograd.backward(forward(layer, x), torch.ones_like(x))
    return sum(ops.counts.values()) + launches.launches, launches.launches


def report_op_counts(args, device) -> None:
    """Op counts do not depend on the width, heads or batch: a small layer stands for the benchmark's."""
    for T in args.op_seq_lens:
        x = torch.randn(1, T, args.op_d_model, device=device, requires_grad=True)
        for impl in ("torch", "triton"):
            for kind in KINDS:
                ops, launches = count_ops(titans_mixer(kind, args.op_d_model, 2, args.chunk, T, impl, device), x)
                emit(f"titans_{kind}_mixer_{impl}_ops_per_layer_t{T}", ops)
                if impl == "triton":
                    emit(f"titans_{kind}_mixer_triton_kernel_launches_t{T}", launches)
            # HOPE's mixer (MLP memories): per chunk the generator reads and the writes, a launch each way each
            ops, launches = count_ops(hope_mixer(args.op_d_model, 2, args.chunk, T, impl, device), x)
            emit(f"hope_mixer_{impl}_ops_per_chunk_t{T}", ops / (T / args.chunk))
            if impl == "triton":
                emit(f"hope_mixer_triton_kernel_launches_per_chunk_t{T}", launches / (T / args.chunk))


def hope_mixer(d_model: int, heads: int, chunk: int, seq_len: int, impl: str, device) -> SelfModifyingTitans:
    cfg = ModelConfig(arch="hope", d_model=d_model, n_heads=heads, n_layers=1, max_seq_len=seq_len,
                      memory=MemoryConfig(chunk_size=chunk, impl=impl))
    cfg.validate()
    torch.manual_seed(0)
    return SelfModifyingTitans(cfg).to(device)


def scan_inputs(kind, B, H, T, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    raw = dict(k=r(B, H, T, d), v=r(B, H, T, d), q=r(B, H, T, d), eta=r(B, H, T), alpha=r(B, H, T), beta=r(B, H, T))
    if kind == "linear":
        raw["W"] = torch.eye(d, dtype=dtype, device=device).expand(H, d, d) + 0.1 * r(H, d, d)
    else:  # hidden width 2d, as model.memory.hidden_mult = 2
        raw["A"], raw["B"] = 0.5 * r(H, d, 2 * d) / (2 * d) ** 0.5, r(H, 2 * d, d) / d ** 0.5
    return {n: x.clone().requires_grad_() for n, x in raw.items()}


def scan(raw, kind, impl, chunk, doc_start=None):
    """The Titans mixer's memory over the raw inputs; returns the read-outs and the final state."""
    init = {n: raw[n] for n in ("W", "A", "B") if n in raw}
    return memory_scan(init, F.normalize(raw["k"], dim=-1), raw["v"], F.normalize(raw["q"], dim=-1),
                       0.5 * torch.sigmoid(raw["eta"]), F.logsigmoid(raw["alpha"] + 3), F.logsigmoid(raw["beta"]),
                       doc_start, chunk, titans_options(kind), impl=impl)


def outputs_and_grads(raw, kind, impl, chunk, doc_start):
    out, state = scan(raw, kind, impl, chunk, doc_start)
    loss = (out * out.detach().cos()).sum() + sum(s.sum() for s in state.values())
    return [out, *state.values(), *torch.autograd.grad(loss, list(raw.values()))]


def report_errors(device) -> None:
    B, H, T, d, C = 2, 2, 45, 16, 16
    doc_start = torch.zeros(B, H, T, dtype=torch.bool, device=device)
    doc_start[..., 0] = doc_start[0, :, 20] = doc_start[1, :, 7] = True
    for kind in KINDS:
        oracle = outputs_and_grads(scan_inputs(kind, B, H, T, d, device, torch.float64), kind, "sequential", C,
                                   doc_start)
        for dtype, name in ((torch.float64, "fp64"), (torch.float32, "fp32")):
            kernel = outputs_and_grads(scan_inputs(kind, B, H, T, d, device, dtype), kind, "triton", C, doc_start)
            err = max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(kernel, oracle))
            emit(f"{kind}_kernel_vs_oracle_max_rel_error_{name}", err)


def report_times(args, device) -> None:
    compiled = torch.compile(scan)
    for kind in KINDS:
        for T in args.seq_lens:
            raw = scan_inputs(kind, args.batch, args.heads, T, args.head_dim, device, torch.float32)

            def step(fn, impl, raw=raw, kind=kind):
                out, state = fn(raw, kind, impl, args.chunk)
                torch.autograd.grad(out.square().mean() + sum(s.mean() for s in state.values()), list(raw.values()))
            steps = {"triton": lambda: step(scan, "triton"), "torch_eager": lambda: step(scan, "torch"),
                     "torch_compiled": lambda: step(compiled, "torch")}
            seconds = interleaved_median_seconds(steps, args.reps, device)
            for name, s in seconds.items():
                emit(f"{kind}_scan_{name}_fwd_bwd_ms_t{T}", 1e3 * s)
            emit(f"{kind}_scan_triton_speedup_vs_eager_t{T}", seconds["torch_eager"] / seconds["triton"])
            emit(f"{kind}_scan_triton_speedup_vs_compiled_t{T}", seconds["torch_compiled"] / seconds["triton"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--op-seq-lens", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--op-d-model", type=int, default=64, help="width of the op-count layer (2 heads)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384], help="timing (CUDA)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    emit("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)")
    report_op_counts(args, device)
    report_errors(device)
    if device.type == "cuda":
        emit("timing_shape", f"B={args.batch} H={args.heads} d_head={args.head_dim} chunk={args.chunk}")
        report_times(args, device)


if __name__ == "__main__":
    main()
