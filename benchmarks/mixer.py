"""One token-mixer layer alone: HOPE's self-modifying Titans mixer, the Titans baseline mixer and Transformer++'s
attention at the same width and heads. Three measurements:

- ops per chunk: aten ops dispatched by one layer's forward + backward, divided by the number of memory chunks
  (T / chunk), at each --seq-lens; plus the ten op names HOPE's mixer dispatches most (per chunk, at the longest
  T). Each op is a kernel launch on a GPU, so this is the launch count the mixer kernels work to bring down.
- activation bytes per token at --act-seq-len (batch --act-batch): what one layer's forward allocates and still
  holds when it returns, less its output (the profiler's memory events: saved tensors and, with
  model.memory.recompute_chunks = n, the states kept every n chunks); and the peak of one forward + backward
  above the memory before it (torch.cuda's peak statistic on a GPU, the profiler's per-op allocations in time
  order on a CPU).
- forward + backward tokens/s of the three layers at the longest --seq-lens, the layers taking turns; --compile
  compiles each layer (layer.compile()) for this timing only, during the two warm-up rounds (a cold compile can
  take minutes on a CPU). The op counts and activation bytes are always of the eager layers.

    python -m benchmarks.mixer [--d-model 256 --heads 8 --chunk 64 --batch 4 --seq-lens 256 512
                                --act-seq-len 4096 --reps 5 --compile --device cpu]

Prints `key: value` lines.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import add_run_options, emit, interleaved_median_seconds, start_run, sync
from megatron_hope.config import MemoryConfig, ModelConfig
from megatron_hope.model.attention import CausalSelfAttention
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer

LAYERS = {"hope_mixer": ("hope", SelfModifyingTitans), "titans_mixer": ("titans", TitansMixer),
          "transformerpp_attention": ("transformerpp", CausalSelfAttention)}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name (e.g. "mm.default")."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def make_layer(name: str, d_model: int, heads: int, chunk: int, seq_len: int, device: torch.device,
               recompute_chunks: int = 0) -> nn.Module:
    arch, cls = LAYERS[name]
    cfg = ModelConfig(arch=arch, d_model=d_model, n_heads=heads, n_layers=1, max_seq_len=seq_len,
                      memory=MemoryConfig(chunk_size=chunk, recompute_chunks=recompute_chunks))
    cfg.validate()
    torch.manual_seed(0)
    return cls(cfg).to(device)


def forward(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's output (the mixers also return their carried state, dropped here)."""
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def fwd_bwd(layer: nn.Module, x: Tensor) -> None:
    forward(layer, x).sum().backward()


def op_counts(layer: nn.Module, x: Tensor) -> Counter[str]:
    """Ops of one forward + backward (after an uncounted warm-up), from the layer's input to its gradients."""
    fwd_bwd(layer, x)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    grad_out = torch.ones_like(x)
    with OpCounter() as counter:
        torch.autograd.backward(forward(layer, x), grad_out)
    return counter.counts


def retained_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes the forward allocates and still holds when it returns (what backward keeps alive: saved tensors,
    checkpointed states), less its output: the net of the profiler's memory events on x's device."""
    cpu = x.device.type == "cpu"
    with profile(activities=[ProfilerActivity.CPU if cpu else ProfilerActivity.CUDA], profile_memory=True) as prof:
        out = forward(layer, x)
    held = sum(e.self_cpu_memory_usage if cpu else e.self_device_memory_usage for e in prof.events())
    fresh_output = out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    return held - (out.untyped_storage().nbytes() if fresh_output else 0)


def peak_bytes(layer: nn.Module, x: Tensor) -> int:
    """Peak memory of one forward + backward above what was allocated before it, after a warm-up step (so the
    parameters' gradients already exist): torch.cuda's peak statistic on a GPU; on a CPU, the running sum of the
    profiler's per-event memory changes in time order (an op's own transient peak left out)."""
    fwd_bwd(layer, x)
    if x.device.type == "cuda":
        sync(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        fwd_bwd(layer, x)
        sync(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(layer, x)
    # an op's own allocations count from its start; what an enclosing event frees (the autograd engine dropping
    # a node's buffers) counts at its end
    changes = sorted((e.time_range.end if e.cpu_children else e.time_range.start, e.self_cpu_memory_usage)
                     for e in prof.events() if e.self_cpu_memory_usage)
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def report_op_counts(args: argparse.Namespace, device: torch.device) -> None:
    for T in sorted(args.seq_lens):
        x = torch.randn(args.batch, T, args.d_model, device=device, requires_grad=True)
        n_chunks = T / args.chunk
        for name, key in (("hope_mixer", "mixer"), ("titans_mixer", "titans_mixer")):
            counts = op_counts(make_layer(name, args.d_model, args.heads, args.chunk, T, device), x)
            emit(f"{key}_ops_per_chunk_t{T}", sum(counts.values()) / n_chunks)
            if name == "hope_mixer":
                hope_top = [(op, n / n_chunks) for op, n in counts.most_common(10)]  # the longest T's is kept
    emit("hope_top_ops", ", ".join(f"{op}={n:.4g}" for op, n in hope_top))


def report_activations(args: argparse.Namespace, device: torch.device) -> None:
    T, B = args.act_seq_len, args.act_batch
    emit("activation_shape", f"B={B} T={T}")
    x = torch.randn(B, T, args.d_model, device=device, requires_grad=True)
    held, peak = {}, {}
    for name in LAYERS:
        layer = make_layer(name, args.d_model, args.heads, args.chunk, T, device)
        held[name] = retained_bytes(layer, x) / (B * T)
        peak[name] = peak_bytes(layer, x) / (B * T)
        emit(f"{name}_retained_bytes_per_token", round(held[name]))
        emit(f"{name}_peak_bytes_per_token", round(peak[name]))
    emit("hope_vs_transformerpp_activation_ratio", held["hope_mixer"] / held["transformerpp_attention"])
    emit("hope_vs_transformerpp_peak_ratio", peak["hope_mixer"] / peak["transformerpp_attention"])
    # model.memory.recompute_chunks = n: the forward keeps the state every n chunks and views of its inputs
    for n in (1, 2, 4):
        layer = make_layer("hope_mixer", args.d_model, args.heads, args.chunk, T, device, recompute_chunks=n)
        recomputed, recomputed_peak = retained_bytes(layer, x) / (B * T), peak_bytes(layer, x) / (B * T)
        emit(f"hope_mixer_recompute_chunks_{n}_retained_bytes_per_token", round(recomputed))
        emit(f"hope_mixer_recompute_chunks_{n}_peak_bytes_per_token", round(recomputed_peak))
        emit(f"hope_recompute_chunks_{n}_vs_transformerpp_activation_ratio", recomputed / held["transformerpp_attention"])
        emit(f"hope_recompute_chunks_{n}_vs_transformerpp_peak_ratio", recomputed_peak / peak["transformerpp_attention"])


def report_throughput(args: argparse.Namespace, device: torch.device) -> None:
    T, B = max(args.seq_lens), args.batch
    emit("throughput_shape", f"B={B} T={T}")
    x = torch.randn(B, T, args.d_model, device=device, requires_grad=True)
    layers = {name: make_layer(name, args.d_model, args.heads, args.chunk, T, device) for name in LAYERS}
    if args.compile:
        for layer in layers.values():
            layer.compile()
    steps = {name: (lambda layer=layer: fwd_bwd(layer, x)) for name, layer in layers.items()}
    seconds = interleaved_median_seconds(steps, args.reps, device)
    for name, s in seconds.items():
        emit(f"{name}_fwd_bwd_tokens_per_s", B * T / s)
    emit("hope_vs_transformerpp_mixer_tokens_per_s_ratio",
         seconds["transformerpp_attention"] / seconds["hope_mixer"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64, help="memory chunk size")
    parser.add_argument("--batch", type=int, default=4, help="batch of the op counts and the timing")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512], help="op counts; timing at the longest")
    parser.add_argument("--act-seq-len", type=int, default=4096, help="sequence length of the activation bytes")
    parser.add_argument("--act-batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds after two warm-up rounds")
    add_run_options(parser, "torch.compile each layer for the timing")
    args = parser.parse_args(argv)
    device = start_run(args)
    emit("shape", f"d_model={args.d_model} heads={args.heads} chunk={args.chunk} batch={args.batch}")
    report_op_counts(args, device)
    report_activations(args, device)
    report_throughput(args, device)


if __name__ == "__main__":
    main()
