"""Chunk-parallel inner loop vs the token-by-token oracle, fwd+bwd, linear and MLP memory.

    python -m benchmarks.inner_loop [--seq-len 2048 --chunk 64 --head-dim 64 --heads 4 --reps 5 --device cpu]

Prints `key: value` lines; `speedup_chunked_vs_sequential` is the geometric mean over the two memory kinds.
The oracle is the reference used by the tests (one token at a time, inner gradients by autograd). The four runs
(linear and MLP memory, chunk-parallel and sequential) take turns in every repetition, after one warm-up round.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from benchmarks.common import emit, interleaved_median_seconds
from megatron_hope.ops.memory import MemoryOptions, memory_scan


def _case(kind: str, B: int, H: int, T: int, w: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    m = 2 * w
    init = {"W": r(H, w, w) * 0.1} if kind == "linear" else {"A": r(H, w, m) * 0.1, "B": r(H, m, w) / w ** 0.5}
    raw = dict(k=r(B, H, T, w), v=r(B, H, T, w), q=r(B, H, T, w), eta=r(B, H, T), alpha=r(B, H, T), beta=r(B, H, T))
    leaves = list(init.values()) + list(raw.values())
    for x in leaves:
        x.requires_grad_(True)
    return init, raw, leaves


def fwd_bwd(kind: str, impl: str, init, raw, leaves, chunk: int) -> None:
    opts = MemoryOptions(kind=kind, self_target=True)
    out, state = memory_scan(init, F.normalize(raw["k"], dim=-1), raw["v"], raw["q"], torch.sigmoid(raw["eta"]) * 0.1,
                             F.logsigmoid(raw["alpha"] + 4), F.logsigmoid(raw["beta"]), None, chunk, opts, impl=impl)
    torch.autograd.grad(out.square().mean(), leaves)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    emit("device", torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads")
    emit("shape", f"B={a.batch} H={a.heads} T={a.seq_len} d_head={a.head_dim} C={a.chunk}")
    impls = {"chunked": "torch", "sequential": "sequential"}  # output keys keep the chunk-parallel form's old name
    cases = {kind: _case(kind, a.batch, a.heads, a.seq_len, a.head_dim, dev) for kind in ("linear", "mlp")}
    steps = {f"{kind}_{name}": (lambda kind=kind, impl=impl: fwd_bwd(kind, impl, *cases[kind], a.chunk))
             for kind in cases for name, impl in impls.items()}
    seconds = interleaved_median_seconds(steps, a.reps, dev, warmup=1)
    speedups = []
    for kind in cases:
        chunked, sequential = seconds[f"{kind}_chunked"], seconds[f"{kind}_sequential"]
        emit(f"{kind}_chunked_fwd_bwd_s", chunked)
        emit(f"{kind}_sequential_fwd_bwd_s", sequential)
        emit(f"{kind}_chunked_tokens_per_s", a.batch * a.seq_len / chunked)
        emit(f"{kind}_speedup_chunked_vs_sequential", sequential / chunked)
        speedups.append(sequential / chunked)
    emit("speedup_chunked_vs_sequential", math.exp(sum(map(math.log, speedups)) / len(speedups)))


if __name__ == "__main__":
    main()
