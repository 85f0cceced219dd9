"""Every public op, one registry (`CASES`), and the rules every op keeps, each a test over the whole registry:

- strided, sliced, offset and transposed views of every tensor argument give the contiguous answer, on every
  backend that runs on the device (the reference, Triton in the interpreter on CPU or compiled on a GPU, the
  CUDA extension on a GPU), forward and, for differentiable ops, backward with a strided output gradient. An
  argument the op updates in place (a decode state or cache) cannot be copied behind the caller's back: a
  kernel that needs another layout refuses it with a ValueError naming it;
- `backend="torch"` runs PyTorch alone;
- every custom op the kernels reach passes `opcheck`, and its fake describes the kernel's outputs exactly;
- an empty dimension in any argument is a ValueError;
- "auto" takes the reference where no kernel takes the input (float64, a gradient needed).

Each runs on CPU and, gpu-marked, on CUDA. A new public op joins by adding one `Case` to `CASES` (a test fails
for an op missing from the list).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import pytest
import torch

import based.ops
from based.ops import LinearAttentionState, WindowCache
from based.ops._backend import cuda_extension_available, triton_available
from tests.helpers import rel_err

# Every test that runs ops runs once per device; the CUDA run carries the gpu mark (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def runnable_backends(kernels: tuple[str, ...], device: str) -> list[str]:
    """The backends that run on `device`: "torch", and on a GPU "auto", plus those of `kernels` ("triton",
    "cuda") the machine has (Triton on CPU in its interpreter)."""
    gpu = device == "cuda"
    runnable = ["torch"] + (["auto"] if gpu else [])
    if "triton" in kernels and triton_available() and (gpu or INTERPRETED):
        runnable.append("triton")
    if "cuda" in kernels and gpu and cuda_extension_available():
        runnable.append("cuda")
    return runnable


@dataclasses.dataclass
class Case:
    """`make(gen)` -> the op's tensor arguments by name (contiguous, on CPU); `run(backend, **tensors)` -> its
    outputs (a tensor or a tuple); `kernels`: its kernel backends; `in_place`: arguments the op updates; `grad`:
    arguments to differentiate."""

    op: str
    make: Callable[[torch.Generator], dict]
    run: Callable[..., object]
    kernels: tuple[str, ...]
    in_place: tuple[str, ...] = ()
    grad: tuple[str, ...] = ()
    kernels_differentiable: bool = False  # else only "torch" and "auto" are differentiated

    def inputs(self, device: str, seed: int = 0) -> dict:
        return {n: t.to(device) for n, t in self.make(torch.Generator().manual_seed(seed)).items()}

    def differentiates(self, backend: str) -> tuple[str, ...]:
        return self.grad if backend in ("torch", "auto") or self.kernels_differentiable else ()


def randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def la_inputs(gen, seq=True):
    B, T, H, d, dv = 2, 5, 3, 4, 6
    lead = (B, T, H) if seq else (B, H)
    return dict(q=randn(gen, *lead, d, scale=0.5), k=randn(gen, *lead, d, scale=0.5), v=randn(gen, *lead, dv),
                kv=randn(gen, B, H, 15, dv), ksum=randn(gen, B, H, 15).abs() + 1)


def la_run(backend, q, k, v, kv, ksum):
    o, state = based.ops.linear_attention(q, k, v, initial_state=LinearAttentionState(kv, ksum), return_state=True,
                                          backend=backend)
    return o, state.kv, state.ksum


def la_step_run(backend, q, k, v, kv, ksum):
    return based.ops.linear_attention_step(q, k, v, LinearAttentionState(kv, ksum), backend=backend)


def swa_inputs(gen, seq=True):
    B, T, H, Hkv, D, W = 2, 7, 4, 2, 8, 3
    lead = (B, T) if seq else (B,)
    out = dict(q=randn(gen, *lead, H, D), k=randn(gen, *lead, Hkv, D), v=randn(gen, *lead, Hkv, D))
    if not seq:
        out.update(cache_k=randn(gen, B, W, Hkv, D), cache_v=randn(gen, B, W, Hkv, D))
    return out


def swa_step_run(backend, q, k, v, cache_k, cache_v):
    return based.ops.sliding_window_attention_step(q, k, v, WindowCache(cache_k, cache_v), 4, backend=backend)


def cache_write_run(backend, k, v, cache_k, cache_v):
    based.ops.window_cache_write(WindowCache(cache_k, cache_v), k, v, 2)
    return ()


def cache_read_run(backend, cache_k, cache_v):
    return based.ops.window_cache_read(WindowCache(cache_k, cache_v), 2)


def conv_inputs(gen, step=False, gated=None):
    B, T, D, K = 2, 6, 5, 3
    out = dict(x=randn(gen, B, D) if step else randn(gen, B, T, D), weight=randn(gen, D, K), bias=randn(gen, D),
               state=randn(gen, B, D, K))
    if gated if gated is not None else step:
        out["gate"] = randn(gen, *out["x"].shape)
    return out


def linear_inputs(gen):
    K, N = 12, 6
    return dict(x=randn(gen, 1, 1, K), weight=randn(gen, 2 * N, K, scale=K**-0.5), bias=randn(gen, 2 * N),
                residual=randn(gen, 1, 1, N), norm_weight=1 + randn(gen, K).abs())


CASES = [
    Case("taylor_feature_map", lambda g: dict(x=randn(g, 3, 4, 5)),
         lambda b, x: based.ops.taylor_feature_map(x, backend=b), ("cuda",), grad=("x",)),
    Case("linear_attention", la_inputs, la_run, ("triton",), grad=("q", "k", "v", "kv", "ksum"),
         kernels_differentiable=True),
    Case("linear_attention_step", lambda g: la_inputs(g, seq=False), la_step_run,
         ("triton", "cuda"), in_place=("kv", "ksum")),
    Case("sliding_window_attention", swa_inputs,
         lambda b, q, k, v: based.ops.sliding_window_attention(q, k, v, window=3, backend=b),
         ("triton",), grad=("q", "k", "v"), kernels_differentiable=True),
    Case("sliding_window_attention_step", lambda g: swa_inputs(g, seq=False), swa_step_run,
         ("triton",), in_place=("cache_k", "cache_v")),
    Case("window_cache_write", lambda g: {n: t for n, t in swa_inputs(g, seq=False).items() if n != "q"}
         | dict(k=randn(g, 2, 2, 2, 8), v=randn(g, 2, 2, 2, 8)), cache_write_run, ["torch"],
         in_place=("cache_k", "cache_v")),
    Case("window_cache_read", lambda g: {n: t for n, t in swa_inputs(g, seq=False).items() if n.startswith("cache")},
         cache_read_run, ["torch"]),
    Case("linear", linear_inputs,
         lambda b, x, weight, bias, residual, norm_weight: based.ops.linear(
             x, weight, bias, residual=residual, gated=True, norm_weight=norm_weight, backend=b),
         ("triton",), grad=("x", "weight", "bias", "residual", "norm_weight")),
    Case("stacked_linear", lambda g: dict(x=randn(g, 1, 1, 12), w0=randn(g, 5, 12), w1=randn(g, 3, 12),
                                          norm_weight=1 + randn(g, 12).abs()),
         lambda b, x, w0, w1, norm_weight: based.ops.stacked_linear(x, [w0, w1], norm_weight=norm_weight, backend=b),
         ("triton",), grad=("x", "w0", "w1", "norm_weight")),
    Case("rms_norm", lambda g: dict(x=randn(g, 2, 3, 10), weight=randn(g, 10), residual=randn(g, 2, 3, 10)),
         lambda b, x, weight, residual: based.ops.rms_norm(x, weight, residual=residual, backend=b),
         ("triton",), grad=("x", "weight", "residual"), kernels_differentiable=True),
    Case("apply_rotary", lambda g: dict(x=randn(g, 2, 3, 4, 8),
                                        positions=torch.tensor([3, 7, 11])),
         lambda b, x, positions: based.ops.apply_rotary(x, positions, backend=b), ("triton",),
         grad=("x",), kernels_differentiable=True),
    Case("causal_conv1d", conv_inputs,
         lambda b, x, weight, bias, state: based.ops.causal_conv1d(x, weight, bias, initial_state=state,
                                                                   return_state=True, backend=b),
         ("triton",), grad=("x", "weight", "bias", "state"), kernels_differentiable=True),
    Case("gated_conv1d", lambda g: conv_inputs(g, gated=True),
         lambda b, x, weight, bias, state, gate: based.ops.gated_conv1d(x, gate, weight, bias, initial_state=state,
                                                                         return_state=True, backend=b),
         ("triton",), grad=("x", "gate", "weight", "bias", "state"), kernels_differentiable=True),
    Case("causal_conv1d_step", lambda g: {n: t for n, t in conv_inputs(g, step=True).items() if n != "gate"},
         lambda b, x, weight, bias, state: based.ops.causal_conv1d_step(x, state, weight, bias, backend=b),
         ("triton",), in_place=("state",), grad=("x", "weight", "bias")),
    Case("gated_conv1d_step", lambda g: conv_inputs(g, step=True),
         lambda b, x, weight, bias, state, gate: based.ops.gated_conv1d_step(x, gate, state, weight, bias, backend=b),
         ("triton",), in_place=("state",), grad=("x", "gate", "weight", "bias")),
    Case("linear_gated_conv1d_step",
         lambda g: dict(x=randn(g, 1, 12), weight=randn(g, 10, 12, scale=12**-0.5), bias=randn(g, 10),
                        state=randn(g, 1, 5, 3), conv_weight=randn(g, 5, 3), norm_weight=1 + randn(g, 12).abs()),
         lambda b, x, weight, bias, state, conv_weight, norm_weight: based.ops.linear_gated_conv1d_step(
             x, weight, bias, state, conv_weight, norm_weight=norm_weight, backend=b),
         ("triton",), in_place=("state",)),
    Case("linear_cross_entropy",
         lambda g: dict(x=randn(g, 7, 6), weight=randn(g, 9, 6), labels=torch.tensor([1, -100, 8, 0, 3, 3, 5])),
         lambda b, x, weight, labels: based.ops.linear_cross_entropy(x, weight, labels, chunk_size=3, backend=b)[None],
         (), grad=("x", "weight")),
]


def test_every_public_op_has_a_case():
    public = {name for name in based.ops.__all__ if callable(getattr(based.ops, name))
              and not isinstance(getattr(based.ops, name), type)} - {"feature_dim_of"}
    assert public == {case.op for case in CASES}


def poison(x: torch.Tensor):
    """What fills the gaps between a view's elements: NaN, or for integers a value no position takes."""
    return float("nan") if x.is_floating_point() else -(2**31)


def relayout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `x` in another memory layout: a view, never contiguous where `x` has room for that."""
    if how == "sliced":  # every other element of a wider buffer: stride 2 along the last dim
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), poison(x), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == "offset":  # a slice that starts inside its storage, rows further apart than their length
        if x.dim() == 1:
            return torch.cat([x[:1], x])[1:]
        big = torch.full((x.shape[0] + 1, *x.shape[1:-1], x.shape[-1] + 3), poison(x), dtype=x.dtype,
                         device=x.device)
        big[1:, ..., :x.shape[-1]] = x
        return big[1:, ..., :x.shape[-1]]
    if how == "transposed":  # the last two dims swapped in memory
        if x.dim() < 2:
            return relayout(x, "sliced")
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(how)


def outputs_of(result) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else [t for t in result if isinstance(t, torch.Tensor)]


# How the ops name the arguments that the cases split into separate tensors.
PUBLIC_NAME = {"kv": "state.kv", "ksum": "state.ksum", "cache_k": "cache.k", "cache_v": "cache.v",
               "state": "state"}


def run_case(case: Case, backend: str, tensors: dict, grad_out: list):
    """(outputs, in-place arguments after the call, gradients of `case.grad`); every argument is a fresh copy,
    laid out as in `tensors`."""
    wrt = case.differentiates(backend)
    leaves = {n: t.detach().requires_grad_(n in wrt) for n, t in tensors.items()}
    outs = outputs_of(case.run(backend, **leaves))
    grads = []
    used = [(o, g) for o, g in zip(outs, grad_out) if o.requires_grad]
    if used:
        torch.autograd.backward([o for o, _ in used], [g for _, g in used])
        grads = [leaves[n].grad for n in wrt]
    return [o.detach() for o in outs], [leaves[n].detach() for n in case.in_place], grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["sliced", "offset", "transposed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.op)
def test_strided_views_give_the_contiguous_result(case, how, device):
    gen = torch.Generator().manual_seed(1)
    tensors = case.inputs(device)

    def laid_out(name=None):
        return {n: relayout(t, how) if n == name else t.clone() for n, t in tensors.items()}

    for backend in runnable_backends(case.kernels, device):
        shapes = [o.shape for o in outputs_of(case.run(backend, **laid_out()))]
        grad_out = [randn(gen, *shape).to(device) for shape in shapes]
        want = run_case(case, backend, laid_out(), grad_out)
        for name, tensor in tensors.items():
            if tensor.numel() <= 1:
                continue
            try:
                got = run_case(case, backend, laid_out(name), [relayout(g, how) for g in grad_out])
            except ValueError as err:
                # Only an argument updated in place may be refused, by a forced kernel, and by name.
                assert name in case.in_place and backend not in ("torch", "auto"), f"{case.op}[{backend}] {name}: {err}"
                assert PUBLIC_NAME[name] in str(err), f"the error does not name {PUBLIC_NAME[name]}: {err}"
                continue
            for part, want_list, got_list in zip(("output", "in-place argument", "gradient"), want, got):
                assert len(want_list) == len(got_list)
                for i, (w, g) in enumerate(zip(want_list, got_list)):
                    assert w.shape == g.shape
                    err = rel_err(g, w)
                    assert err < 1e-5, f"{case.op}[{backend}], {how} {name}: {part} {i} relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.op)
def test_torch_backend_runs_only_pytorch(case, device, auto_picks_kernels):
    """backend="torch" is the reference that bisects a kernel bug: it must never reach a `based::` op (every
    Triton and CUDA kernel is one), forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class KernelCalls(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "based":
                KernelCalls.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    tensors = case.inputs(device)
    grad_out = None
    with KernelCalls():
        leaves = {n: t.requires_grad_(n in case.grad) for n, t in tensors.items()}
        outs = [o for o in outputs_of(case.run("torch", **leaves)) if o.requires_grad]
        if outs:
            grad_out = [torch.ones_like(o) for o in outs]
            torch.autograd.backward(outs, grad_out)
    assert KernelCalls.seen == [], f"{case.op}(backend='torch') ran kernels: {KernelCalls.seen}"


def record_kernel_calls(case: Case, backend: str, how: str, device: str) -> list:
    """(op, args, kwargs) of every `based::` custom op that `case` reaches on `backend`, forward and backward,
    with every tensor argument it does not update in place in the `how` layout; the recorded tensors are copies
    with the same strides."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    class Recorder(TorchDispatchMode):
        calls: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "based":
                Recorder.calls.append((func, tree_map(clone_strided, args), tree_map(clone_strided, kwargs)))
            return func(*args, **kwargs)

    # Arguments updated in place stay contiguous: kernels may refuse other layouts for them.
    tensors = {n: t if n in case.in_place else relayout(t, how) for n, t in case.inputs(device).items()}
    with Recorder():
        outs = outputs_of(case.run(backend, **{n: t.requires_grad_(n in case.differentiates(backend))
                                               for n, t in tensors.items()}))
        used = [o for o in outs if o.requires_grad]
        if used:
            torch.autograd.backward(used, [relayout(torch.ones_like(o), how) for o in used])
    return Recorder.calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["sliced", "transposed"])
@pytest.mark.parametrize("case", [c for c in CASES if c.kernels], ids=lambda c: c.op)
def test_custom_ops_fakes_match_kernels_on_strided_inputs(case, how, device):
    """Each custom op the kernels run passes `torch.library.opcheck`, and its fake (what torch.compile plans
    with) gives the real outputs' shapes, dtypes and strides, for the strided inputs models produce."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves, tree_map

    kernels = set(runnable_backends(case.kernels, device)) - {"torch", "auto"}
    if not kernels:
        pytest.skip(f"no kernel of {case.op} runs on {device} here")
    for backend in kernels:
        calls = record_kernel_calls(case, backend, how, device)
        assert calls, f"{case.op}[{backend}] reached no custom op"
        for func, args, kwargs in calls:
            real = [t for t in tree_leaves(func(*tree_map(clone_strided, args), **tree_map(clone_strided, kwargs)))
                    if isinstance(t, torch.Tensor)]
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake_args, fake_kwargs = tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor)
                                                  else x, (args, kwargs))
                fake = [t for t in tree_leaves(func(*fake_args, **fake_kwargs)) if isinstance(t, torch.Tensor)]
            assert [(t.shape, t.dtype, t.stride()) for t in fake] == [(t.shape, t.dtype, t.stride()) for t in real], \
                f"{func}: the fake's outputs differ from the kernel's"
            torch.library.opcheck(func, tree_map(clone_strided, args), tree_map(clone_strided, kwargs))


def clone_strided(x):
    """A copy of a tensor with the same strides (other values unchanged)."""
    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.op)
def test_empty_dimensions_are_a_value_error(case, device):
    """One rule for every op: any tensor argument with a dimension of size 0 is a ValueError (never an empty
    result, a reshape error from inside a kernel wrapper, or an index error)."""
    tensors = case.inputs(device)
    for backend in runnable_backends(case.kernels, device):
        for name, tensor in tensors.items():
            for dim in range(tensor.dim()):
                empty = tensor.narrow(dim, 0, 0)
                with pytest.raises(ValueError):
                    case.run(backend, **dict(tensors, **{name: empty}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.op)
def test_auto_takes_the_reference_where_kernels_cannot_go(case, dtype, device, auto_picks_kernels):
    """"auto" never fails for want of a kernel: with gradients needed (the inference-only kernels give none)
    and with float64 inputs (no kernel takes them) it gives what backend="torch" gives."""
    tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in case.inputs(device).items()}
    results = []
    for backend in ("auto", "torch"):
        leaves = {n: t.clone().requires_grad_(n in case.grad) for n, t in tensors.items()}
        outs = outputs_of(case.run(backend, **leaves))
        used = [o for o in outs if o.requires_grad]
        if used:
            torch.autograd.backward(used, [torch.ones_like(o) for o in used])
        results.append([o.detach() for o in outs] + [leaves[n].grad for n in case.grad]
                       + [leaves[n].detach() for n in case.in_place])
    for got, want in zip(*results):
        # A differentiable kernel may take fp32 inputs: then it agrees to fp32 rounding, not bit for bit.
        assert got is not None and rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-12), case.op


FLAG_CALLS = {
    "linear_attention(causal=)": lambda t: based.ops.linear_attention(t["q"], t["k"], t["v"], causal="yes"),
    "linear_attention(normalize=)": lambda t: based.ops.linear_attention(t["q"], t["k"], t["v"], normalize=1),
    "linear_attention(return_state=)": lambda t: based.ops.linear_attention(t["q"], t["k"], t["v"],
                                                                            return_state="no"),
    "linear_attention_step(normalize=)": lambda t: based.ops.linear_attention_step(
        t["q"][:, 0], t["k"][:, 0], t["v"][:, 0], LinearAttentionState(t["kv"], t["ksum"]), normalize="yes"),
    "causal_conv1d(return_state=)": lambda t: based.ops.causal_conv1d(t["v"][:, :, 0], torch.ones(6, 3),
                                                                      return_state=1),
}


@pytest.mark.parametrize("call", FLAG_CALLS, ids=str)
def test_flags_must_be_bools(call):
    tensors = la_inputs(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=call.split("(")[1].rstrip("=)") + " must be a bool"):
        FLAG_CALLS[call](tensors)


@pytest.mark.parametrize("eps", [-1.0, "1e-6", None])
def test_eps_must_be_a_number_at_least_zero(eps):
    tensors = la_inputs(torch.Generator().manual_seed(0))
    error = ValueError if isinstance(eps, float) else TypeError
    with pytest.raises(error, match="eps must be"):
        based.ops.linear_attention(tensors["q"], tensors["k"], tensors["v"], eps=eps)
    with pytest.raises(error, match="eps must be"):
        based.ops.rms_norm(tensors["v"], tensors["v"][0, 0, 0], eps)


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_linear_attention_without_state_rejects_each_empty_dimension(dim):
    q, k, v = (t.narrow(dim, 0, 0) for t in (torch.ones(2, 3, 2, 4), torch.ones(2, 3, 2, 4), torch.ones(2, 3, 2, 5)))
    with pytest.raises(ValueError, match="must not have empty dimensions"):
        based.ops.linear_attention(q, k, v)
