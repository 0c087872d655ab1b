"""The memory scan's Triton kernels (ops/triton/: linear and MLP memory) against the PyTorch forms: outputs,
final states and every gradient (keys, values, queries, gates, the init and the carried state), in fp64 to 1e-10,
for the option combinations the mixers use, with document starts and a ragged last chunk. On a CPU the kernels
run under Triton's interpreter (tests/conftest.py), so the shapes are tiny. The hand-worked spec cases of
test_spec_conventions.py also run on the kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")

from megatron_hope.config import MemoryConfig, ModelConfig  # noqa: E402
from megatron_hope.config_base import ConfigError  # noqa: E402
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer  # noqa: E402
from megatron_hope.ops.memory import MemoryOptions, memory_scan, resolve_impl  # noqa: E402

B, H, T, D, M, CHUNK = 2, 2, 21, 8, 16, 8  # T = 2 full chunks and a ragged one; M: the MLP memory's hidden width
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: Triton's interpreter


def make_inputs(dtype=torch.float64, seed=1, T=T, kind="linear"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)

    streams = dict(k=F.normalize(r(B, H, T, D), dim=-1), v=r(B, H, T, D), q=r(B, H, T, D),
                   eta=0.5 * torch.sigmoid(r(B, H, T)), log_alpha=F.logsigmoid(r(B, H, T) + 3),
                   log_beta=F.logsigmoid(r(B, H, T) + 1))
    if kind == "linear":
        init = {"W": torch.eye(D, dtype=dtype, device=DEVICE).expand(H, D, D) + 0.1 * r(H, D, D)}
    else:
        init = {"A": 0.5 * r(H, D, M) / M ** 0.5, "B": r(H, M, D) / D ** 0.5}
    return streams, init


def doc_starts(T=T):
    """Row 0: a document at token 5 (mid-chunk); row 1: documents at 13 and 14 (one token long) and at 16."""
    ds = torch.zeros(B, T, dtype=torch.bool)
    ds[:, 0] = True
    ds[0, 5] = True
    ds[1, [13, 14, 16]] = True
    return ds[:, None].expand(B, H, T).to(DEVICE)


def weighted_loss(out, state):
    """A loss touching every output and state entry with distinct weights (random-like cotangents)."""
    def w(x):
        return torch.cos(torch.arange(x.numel(), dtype=x.dtype, device=x.device).view_as(x))
    return (out * w(out)).sum() + sum((s * w(s).flip(-1)).sum() for s in state.values())


def run(impl, opts, streams, init, doc_start, state=None):
    """Outputs, final state and the gradients of weighted_loss w.r.t. every input (and the carried state)."""
    xs = {n: x.clone().requires_grad_() for n, x in streams.items()}
    init = {n: w.clone().requires_grad_() for n, w in init.items()}
    state = {n: s.clone().requires_grad_() for n, s in state.items()} if state is not None else None
    out, final = memory_scan(init, xs["k"], xs["v"], xs["q"], xs["eta"], xs["log_alpha"],
                             xs["log_beta"] if opts.momentum else None, doc_start, CHUNK, opts, state=state, impl=impl)
    leaves = {**xs, **{f"init_{n}": w for n, w in init.items()},
              **({f"state_{n}": s for n, s in state.items()} if state else {})}
    if not opts.momentum:
        leaves.pop("log_beta")
    # the init is unused when a carried state and no document start: its gradient is then zero
    grads = torch.autograd.grad(weighted_loss(out, final), list(leaves.values()), materialize_grads=True)
    return out, final, dict(zip(leaves, grads))


def assert_same(kernel, reference, tol):
    out, state, grads = kernel
    ref_out, ref_state, ref_grads = reference
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    assert state.keys() == ref_state.keys()
    for n in state:
        torch.testing.assert_close(state[n], ref_state[n], rtol=tol, atol=tol, msg=lambda m: f"state {n}: {m}")
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=tol, atol=tol, msg=lambda m: f"d{n}: {m}")


CASES = {  # the Titans mixer's options, HOPE's options, and the remaining switches, for both memories
    "linear-titans-defaults": dict(kind="linear", momentum_form="titans", dgd="none", grad_clip=1.0),
    "linear-hope-selftarget-clip": dict(kind="linear", dgd="first", self_target=True, grad_clip=0.7),
    "linear-before-write-noclip": dict(kind="linear", dgd="first", readout="before_write"),
    "linear-chunk-start-no-momentum": dict(kind="linear", momentum=False, dgd="first", readout="chunk_start",
                                           grad_clip=0.5),
    "mlp-titans-defaults": dict(kind="mlp", momentum_form="titans", dgd="none", grad_clip=1.0),
    "mlp-hope-each-selftarget-gelu": dict(kind="mlp", dgd="each", self_target=True, grad_clip=0.7,
                                          activation="gelu"),
    "mlp-before-write-first-noclip": dict(kind="mlp", dgd="first", readout="before_write"),
    "mlp-chunk-start-no-momentum": dict(kind="mlp", momentum=False, dgd="first", readout="chunk_start",
                                        grad_clip=0.5),
}


@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_torch_form(case, docs):
    opts = MemoryOptions(**CASES[case])
    streams, init = make_inputs(kind=opts.kind)
    ds = doc_starts() if docs else None
    assert_same(run("triton", opts, streams, init, ds), run("torch", opts, streams, init, ds), 1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kernel_equals_sequential_oracle(kind):
    opts = MemoryOptions(kind=kind, momentum_form="hope", dgd="first", self_target=True, grad_clip=0.7)
    streams, init = make_inputs(seed=2, kind=kind)
    assert_same(run("triton", opts, streams, init, doc_starts()),
                run("sequential", opts, streams, init, doc_starts()), 1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_continuing_a_carried_state_and_its_gradient(kind):
    """A call continuing a state (the next sequence shard) equals the torch form, gradient w.r.t. that state
    included; and two calls on the kernel compute what one call does."""
    opts = MemoryOptions(kind=kind, momentum_form="titans", dgd="none", grad_clip=1.0)
    streams, init = make_inputs(T=24, seed=3, kind=kind)
    _, state, _ = run("torch", opts, {n: x[..., :8] if x.dim() == 3 else x[..., :8, :] for n, x in streams.items()},
                      init, None)
    state = {n: s.detach() for n, s in state.items()}
    rest = {n: x[..., 8:] if x.dim() == 3 else x[..., 8:, :] for n, x in streams.items()}
    assert_same(run("triton", opts, rest, init, None, state), run("torch", opts, rest, init, None, state), 1e-10)

    def two_calls(impl):
        first, carried = memory_scan(init, *(streams[n][..., :8, :] for n in "kvq"),
                                     *(streams[n][..., :8] for n in ("eta", "log_alpha", "log_beta")),
                                     None, CHUNK, opts, impl=impl)
        second, final = memory_scan(init, *(streams[n][..., 8:, :] for n in "kvq"),
                                    *(streams[n][..., 8:] for n in ("eta", "log_alpha", "log_beta")),
                                    None, CHUNK, opts, state=carried, impl=impl)
        return torch.cat([first, second], -2), final

    whole, whole_state = memory_scan(init, *(streams[n] for n in "kvq"),
                                     *(streams[n] for n in ("eta", "log_alpha", "log_beta")), None, CHUNK, opts,
                                     impl="triton")
    split, split_state = two_calls("triton")
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    for n in whole_state:
        torch.testing.assert_close(split_state[n], whole_state[n], rtol=1e-12, atol=1e-12)


def test_fp32_inputs_stay_close_to_fp64():
    opts = MemoryOptions(kind="linear", momentum_form="titans", dgd="none", grad_clip=1.0)
    streams, init = make_inputs()
    out32, state32, grads32 = run("triton", opts, {n: x.float() for n, x in streams.items()},
                                  {n: w.float() for n, w in init.items()}, doc_starts())
    assert out32.dtype == torch.float32
    assert_same((out32.double(), {n: s.double() for n, s in state32.items()},
                 {n: g.double() for n, g in grads32.items()}), run("torch", opts, streams, init, doc_starts()), 1e-5)


def test_bf16_inputs_run_the_inner_loop_in_fp32():
    """Under autocast or with bf16 activations the scan still runs in fp32: the kernel equals the torch form fed
    the same bf16 inputs, and returns bf16 read-outs and an fp32 state."""
    opts = MemoryOptions(kind="linear", momentum_form="titans", dgd="none", grad_clip=1.0)
    streams, init = make_inputs(dtype=torch.float32)
    streams = {n: x.bfloat16() for n, x in streams.items()}
    out, state, grads = run("triton", opts, streams, init, doc_starts())
    assert out.dtype == torch.bfloat16 and state["W"].dtype == torch.float32
    assert_same((out.float(), state, {n: g.float() for n, g in grads.items()}),
                (lambda o, s, g: (o.float(), s, {n: x.float() for n, x in g.items()}))(
                    *run("torch", opts, streams, init, doc_starts())), 2e-2)


def test_without_queries_only_the_state():
    opts = MemoryOptions(kind="linear", momentum_form="hope", dgd="first")
    streams, init = make_inputs()
    args = (init, streams["k"], streams["v"], None, streams["eta"], streams["log_alpha"], streams["log_beta"],
            doc_starts(), CHUNK, opts)
    out, state = memory_scan(*args, impl="triton")
    _, ref = memory_scan(*args, impl="torch")
    assert out is None
    torch.testing.assert_close(state["W"], ref["W"], rtol=1e-10, atol=1e-10)


def packed_sequence(T, second_document, seed):
    """A (1, T, 16) fp64 input holding two documents, the second from token `second_document` (mid-chunk)."""
    torch.manual_seed(seed)
    x = torch.randn(1, T, 16, dtype=torch.float64).to(DEVICE)
    ds = torch.zeros(1, T, dtype=torch.bool, device=DEVICE)
    ds[0, 0] = ds[0, second_document] = True
    return x, ds


def mixer_outputs_and_grads(mixer, x, ds, impl):
    mixer.cfg.memory.impl = impl
    mixer.zero_grad()
    out, state = mixer(x, ds)
    out.pow(2).sum().backward()
    return out.detach(), state.memory, {n: p.grad.clone() for n, p in mixer.named_parameters()}


MIXERS = {"titans-linear": ("titans", dict(kind="linear")), "titans-mlp": ("titans", dict(kind="mlp")),
          "hope-mlp": ("hope", dict(kind="mlp")), "hope-linear": ("hope", dict(kind="linear")),
          "hope-mlp-adaptive-q-gelu": ("hope", dict(kind="mlp", adaptive_q=True, activation="gelu"))}


@pytest.mark.parametrize("mixer_case", MIXERS)
def test_mixer_on_the_kernels_equals_the_torch_form(mixer_case):
    """The Titans mixer (its memory scan in two launches) and HOPE's self-modifying mixer (per chunk: the
    generator reads in a launch with MLP memories, in PyTorch with linear ones, then the writes and reads in
    another), packed documents and a ragged chunk: outputs, final memories and every parameter's gradient."""
    arch, memory = MIXERS[mixer_case]
    cfg = ModelConfig(arch=arch, d_model=16, n_heads=2, memory=MemoryConfig(chunk_size=8, **memory))
    mixer = (TitansMixer if arch == "titans" else SelfModifyingTitans)(cfg).double().to(DEVICE)
    x, ds = packed_sequence(13, second_document=6, seed=0)
    (out, memory, grads), (ref_out, ref_memory, ref_grads) = (mixer_outputs_and_grads(mixer, x, ds, impl)
                                                              for impl in ("triton", "torch"))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for n in ref_memory:
        torch.testing.assert_close(memory[n], ref_memory[n], rtol=1e-10, atol=1e-10, msg=lambda m: f"{n}: {m}")
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-10, atol=1e-10, msg=lambda m: f"{n}: {m}")


def test_self_modifying_scan_on_the_kernels_equals_the_oracle():
    cfg = ModelConfig(d_model=16, n_heads=2, memory=MemoryConfig(chunk_size=8, readout="before_write"))
    mixer = SelfModifyingTitans(cfg).double().to(DEVICE)
    x, ds = packed_sequence(19, second_document=11, seed=1)
    (out, memory, grads), (ref_out, ref_memory, ref_grads) = (mixer_outputs_and_grads(mixer, x, ds, impl)
                                                              for impl in ("triton", "sequential"))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")


def test_auto_picks_the_kernel_only_where_it_applies():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for kind in ("linear", "mlp"):
        assert resolve_impl("auto", MemoryOptions(kind=kind), cuda) == "triton"
        assert resolve_impl("auto", MemoryOptions(kind=kind), cpu) == "torch"
        assert resolve_impl("auto", MemoryOptions(kind=kind, differentiable=False), cuda) == "torch"
    assert resolve_impl("auto", None, cuda) == "torch"
    assert resolve_impl("chunked") == "torch"


def test_config_refuses_triton_where_no_kernel_exists():
    with pytest.raises(ConfigError, match="memory.impl = 'triton' cannot run with .*differentiable_writes = false.*"
                                          "set model.memory.impl = 'auto'"):
        ModelConfig(memory=MemoryConfig(impl="triton", differentiable_writes=False)).validate()
    for arch in ("hope", "titans"):
        for kind in ("linear", "mlp"):
            ModelConfig(arch=arch, memory=MemoryConfig(kind=kind, impl="triton")).validate()
