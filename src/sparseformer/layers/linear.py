"""``nn.Linear`` with its bias and GELU fused into one oneDNN kernel for CPU inference.

PyTorch's eager CPU ``addmm`` first copies the broadcast bias into the whole output and then
accumulates the product onto it, and ``gelu`` reads and writes the output once more. oneDNN's
``_linear_pointwise`` (the kernel ``torch.compile`` emits for CPU) does the bias and the
activation in the matrix product's epilogue: on a 2-core AVX2 CPU a
``(1568, 512) x (512, 2048)`` linear with GELU takes ~20 ms instead of ~32. It has no
autograd formula, so :func:`linear` uses it only when no gradient is wanted, of the input,
the weight or the bias, in reverse or forward mode (CPU training's
fused adaptive mixing calls it through :func:`packed_linear`, inside a backward of its own),
and never under tracing, export, a dispatch mode (FLOP counting), autocast, or for
non-float32 tensors; everywhere else this is ``F.linear`` with the layer's weight and bias. A
layer that is not a plain ``nn.Linear`` (forward hooks, or a subclass with its own
``forward``: quantisation-aware training, LoRA) is always called itself. The results differ
from ``F.linear`` by float32 rounding only (a different summation order, ~1e-6).

Neither kernel wins everywhere: on the 2-core AMD EPYC the fused one took 19-24 ms where
``F.linear`` and ``gelu`` took 31-39, and on a later day 31-32 ms where they took 20-22. So
the first call of each shape (rows within a power of two, weight shape, GELU, bias, threads)
times both (:func:`faster`) and that shape keeps the faster from then on (:data:`FUSED_LINEAR`).
Two processes may choose differently, so their outputs may differ by that rounding: a training
run, whose resumption must compute as the run it continues, takes one kernel (its mixing's
generator by itself, its validation inside :func:`one_linear_kernel`).

:func:`linear_split` makes the blocks of a layer's output by one product each, so that every
block is contiguous (adaptive mixing's generated matrices). Inside :func:`packed_weights` the
fused kernel reads each weight from a copy laid out for it once, not on every call.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "linear",
    "linear_split",
    "linear_weights",
    "is_plain",
    "fused_linear_available",
    "is_tracing",
    "FUSED_LINEAR",
    "kernel_setting",
    "one_linear_kernel",
    "measured_once",
    "packed_weights",
    "pack_weight",
    "packed_linear",
]

FUSED_LINEAR = "auto"
"""Which kernel CPU inference takes where the fused one may be used: ``"auto"`` (the faster
for each shape, measured once), ``"always"`` or ``"never"`` (``F.linear``)."""

# inside one_linear_kernel, in this thread (and the tasks it starts) only: "always" for "auto"
_ONE_KERNEL: ContextVar[bool] = ContextVar("sparseformer_one_linear_kernel", default=False)

_CHOSEN: dict[tuple[int, ...], bool] = {}  # shape -> whether the fused kernel was faster
_MAX_CHOSEN = 1024  # beyond: the fused kernel unmeasured (a process feeding endless shapes)
_RACE_SECONDS, _RACE_TURNS = 0.005, 10  # how long each kernel of a race is timed, at most

_HAS_KERNEL = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)
_CAN_PACK = _HAS_KERNEL and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# inside packed_weights(): (id of the weight's base, offset, shape) -> (a weak reference to the
# base, the weight's version and address when packed, its packed copy)
_PACKS: ContextVar[dict | None] = ContextVar("sparseformer_packed_weights", default=None)


def is_tracing() -> bool:
    """Under tracing, compilation or ONNX export (shapes are symbolic), or under a
    ``torch.func`` transform (:func:`in_functorch`): use plain ops only."""
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
        or in_functorch()
    )


def in_functorch() -> bool:
    """Under a ``torch.func`` transform (``vmap``, ``grad``, ``functional_call`` inside one):
    tensors are wrapped, and a memory format cannot be asked of them or forced on them."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # torch's private
    return bool(active and active())


def fused_linear_available(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether :func:`linear` takes the fused kernel for these tensors, here and now."""
    return (
        _HAS_KERNEL
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not _differentiated(x, weight, bias)
        and not torch.is_autocast_enabled("cpu")
        and not is_tracing()
        and _get_current_dispatch_mode() is None
    )


def _differentiated(*tensors: Tensor | None) -> bool:
    """Whether autograd differentiates an op on these tensors: reverse mode records it (one of
    them requires grad, a bias alone too: bias-only fine-tuning) or forward mode is on
    (``torch.autograd.forward_ad.dual_level``, where dual tensors require no grad)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return getattr(forward_ad, "_current_level", -1) >= 0  # torch's private: -1 outside a level


def linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    """``layer(x)``, followed by exact (erf) GELU if ``gelu``; ``(..., in) -> (..., out)``."""
    if not is_plain(layer):
        y = layer(x)
        return F.gelu(y) if gelu else y
    return linear_weights(x, layer.weight, layer.bias, gelu)


def linear_split(x: Tensor, layer: nn.Linear, sizes: list[int]) -> tuple[Tensor, ...]:
    """``layer(x).split(sizes, -1)``, each part made by its own product with its rows of the
    weight, so that every part is contiguous: a batched product reads it in place (PyTorch's
    CPU bf16 kernels copy a strided operand first) and backward concatenates no gradient."""
    if not is_plain(layer):
        return layer(x).split(sizes, dim=-1)
    biases = layer.bias.split(sizes) if layer.bias is not None else [None] * len(sizes)
    parts = zip(layer.weight.split(sizes), biases, strict=True)
    return tuple(linear_weights(x, w, b) for w, b in parts)


def linear_weights(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, then GELU if ``gelu``: by the fused kernel where it may
    be used and is the faster for this shape (:data:`FUSED_LINEAR`)."""
    if fused_linear_available(x, weight, bias) and _fused_wins(x, weight, bias, gelu):
        return _fused(x, weight, bias, gelu)
    return _plain(x, weight, bias, gelu)


def _fused(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    return packed_linear(x, _packed(weight), bias, gelu)


@contextmanager
def packed_weights() -> Iterator[None]:
    """Inside the block, CPU inference's fused kernel reads each weight from a copy in
    oneDNN's blocked layout, made on the weight's first use and dropped when the block ends
    (or the weight is freed), where it otherwise lays the weight out again on every call:
    SparseFormer-T at batch 1 about 10% faster (2-core AMD EPYC: 50.4 -> 45.3 ms), at batch 32
    about 3%. The copies take as much memory as the weights, per block. The outputs are the
    kernel's own up to float32 rounding (SparseFormer-T's logits at batch 1 and 32: the same).

    The weights must not change inside the block: leave it to change them, and enter a new
    one (each block, nested ones too, makes copies of its own). A change inside is seen only
    where it moves the weight's version counter (``copy_`` under ``no_grad``,
    ``load_state_dict``); fused optimizers (the trainer's AdamW), ``Module.to()``,
    ``.half()`` and changes through ``.data`` do not, and the stale copy would be used. The
    CLI's evaluation, prediction and benchmark run inside it; it holds in the calling thread."""
    packs: dict = {}
    token = _PACKS.set(packs)
    try:
        yield
    finally:
        _PACKS.reset(token)
        packs.clear()


def _packed(weight: Tensor) -> Tensor:
    """``weight``'s blocked copy inside :func:`packed_weights`, or ``weight`` itself: outside,
    where :func:`pack_weight` makes none, for strided weights (the key knows no strides), and
    for weights made in inference mode (they keep no version counter)."""
    packs = _PACKS.get()
    if packs is None or weight.is_inference() or not weight.is_contiguous():
        return weight
    base = weight if weight._base is None else weight._base  # linear_split's parts are views
    key = (id(base), weight.storage_offset(), *weight.shape)
    stamp = (weight._version, weight.data_ptr())
    held = packs.get(key)
    if held is None or held[0]() is not base or held[1] != stamp:
        packed = pack_weight(weight)
        if packed is None:
            return weight
        dropped = lambda _, key=key: packs.pop(key, None)  # noqa: E731  (the base freed)
        held = packs[key] = (weakref.ref(base, dropped), stamp, packed)
    return held[2]


def pack_weight(weight: Tensor) -> Tensor | None:
    """oneDNN's blocked copy of a float32 CPU ``weight`` ``(out, in)``, for
    :func:`packed_linear` to read many times over (a training step's chunks of rows, within
    which the weight does not change); ``None`` where the fused kernel cannot take it (another
    dtype or device, no reorder kernel, an empty weight). The copy is of the weight as it is
    now: call again after the weight changes."""
    usable = weight.device.type == "cpu" and weight.dtype == torch.float32
    if not (_CAN_PACK and usable and weight.numel() > 0):  # no kernel for an empty weight
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, then GELU if ``gelu``, by oneDNN's fused kernel from
    :func:`pack_weight`'s copy of the weight (or the weight itself); no gradient. The kernel's
    own result: it may differ from ``F.linear``'s by float32 rounding (another summation order)."""
    post = ("gelu", [], "none") if gelu else ("none", [], "")
    bias = None if bias is None else bias.contiguous()  # oneDNN reads it as contiguous
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, *post)


def _plain(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def _fused_wins(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> bool:
    """Whether the fused kernel is the one to take for this call's shape: as
    :data:`FUSED_LINEAR` says, measured on the shape's first call under ``"auto"``."""
    setting = kernel_setting()
    if setting != "auto":
        return setting == "always"
    rows = (x.numel() // max(x.shape[-1], 1)).bit_length()  # 49 rows and 63 alike, not 64
    packing = _PACKS.get() is not None  # a packed weight may win where a plain one lost
    key = (rows, *weight.shape, int(gelu), int(bias is not None), torch.get_num_threads(), packing)
    args = (x, weight, bias, gelu)
    race = lambda: faster(lambda: _fused(*args), lambda: _plain(*args)) == 0  # noqa: E731
    return measured_once(_CHOSEN, key, _MAX_CHOSEN, race, unmeasured=lambda: True)


def measured_once(
    chosen: dict, key: tuple, most: int, race: Callable[[], bool], unmeasured: Callable[[], bool]
) -> bool:
    """``race()``'s answer for ``key``, raced on the key's first call and kept in ``chosen``;
    a key first seen with ``most`` keys kept gets ``unmeasured()`` (a process feeding endless
    shapes), while the keys kept keep their answer."""
    wins = chosen.get(key)
    if wins is None:
        if len(chosen) >= most:
            return unmeasured()
        wins = chosen[key] = race()
    return wins


def kernel_setting() -> str:
    """:data:`FUSED_LINEAR` as it holds for this thread: ``"always"`` for ``"auto"`` inside
    :func:`one_linear_kernel`."""
    return "always" if FUSED_LINEAR == "auto" and _ONE_KERNEL.get() else FUSED_LINEAR


@contextmanager
def one_linear_kernel() -> Iterator[None]:
    """The fused kernel wherever it may be used inside the block, not the faster per shape
    (unless :data:`FUSED_LINEAR` asks for one already), and narrow-head attention by the
    rule of the CPU's build rather than measured (see :func:`~sparseformer.layers.attention.
    attention`): what a training run evaluates with, so that a resumed run computes as the
    process it continues did. It holds in the calling thread only: another thread's inference
    meanwhile (a server beside a run) keeps the faster kernels."""
    token = _ONE_KERNEL.set(True)
    try:
        yield
    finally:
        _ONE_KERNEL.reset(token)


def faster(*calls: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> int:
    """The index of the fastest of ``calls``: each called once to warm up (oneDNN builds its
    kernel on first use), then in turns, twice and on until each has taken ``_RACE_SECONDS``
    in all (at most ``_RACE_TURNS`` turns), the best of its times taken: a call of a tenth of
    a millisecond is timed 10 times, where two times let one interruption choose."""
    for call in calls:
        call()
    best, spent = [float("inf")] * len(calls), [0.0] * len(calls)
    for turn in range(_RACE_TURNS):
        for i, call in enumerate(calls):
            start = clock()
            call()
            took = clock() - start
            best[i], spent[i] = min(best[i], took), spent[i] + took
        if turn >= 1 and min(spent) >= _RACE_SECONDS:
            break
    return best.index(min(best))


def is_plain(layer: nn.Module, kind: type[nn.Module] = nn.Linear) -> bool:
    """Whether ``layer`` computes exactly what ``kind`` does with its weight and bias (by
    default ``F.linear(x, weight, bias)``), so they can be used without calling it: ``kind``'s
    own ``forward`` (not replaced on the instance) and no hooks."""
    own_forward = type(layer).forward is kind.forward and "forward" not in vars(layer)
    return own_forward and not _has_hooks(layer)


def _has_hooks(layer: nn.Module) -> bool:
    """Hooks (feature extraction, pruning, gradient inspection) need the module to be called:
    forward and backward ones, the module's own and the global ones."""
    from torch.nn.modules import module as M

    return bool(
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or M._global_forward_hooks
        or M._global_forward_pre_hooks
        or M._global_backward_hooks
        or M._global_backward_pre_hooks
    )
