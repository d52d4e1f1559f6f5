"""Calling a kernel library's cached, compiled kernels directly, past its Python front end.

FlashAttention-4's interface spends ~90-115 µs of CPU on every call (argument checks, tile choices,
buffer allocation) before it calls one to five compiled kernels, each looked up in a per-function
``compile_cache``. For one input signature (shapes, strides, dtypes, alignment) it always takes the
same decisions, so it calls the same kernels with the same arguments, apart from the tensors.

A ``KernelReplay`` runs the interface once per signature with its caches wrapped, and records every
kernel call: each tensor argument is either one of the inputs or a view of a buffer the interface
allocated. It then replays that record on the same inputs and keeps it only if the replay gives the
interface's outputs; from then on a call allocates the buffers and calls the kernels itself. A
signature whose record does not reproduce (a tensor packed inside another argument, a copy or
fill done outside the caches) keeps calling the interface, said once in the log.

Buffers the interface handed over zero-filled (an accumulator it adds into, say) are zeroed on every
replay; a floating-point buffer that was zero only by chance is found by replaying once with it
filled with NaN, and then left unfilled. Integer buffers (semaphores a kernel may spin on) are never
filled with anything but zeros.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_MISSING = object()


def _signature(t: Tensor) -> tuple:
    ptr = t.data_ptr()
    # the kernels were compiled assuming 16-byte-aligned operands (FA4's default), and the interface
    # copies an operand that is not: the alignment, up to 16 bytes, is part of the signature
    return t.shape, t.stride(), t.dtype, t.device, min(ptr & -ptr, 16) if ptr else 0


def _holds_tensor(obj, depth: int = 0) -> bool:
    if isinstance(obj, Tensor):
        return True
    if depth > 4 or obj is None or isinstance(obj, (int, float, bool, str)):
        return False
    if isinstance(obj, (tuple, list)):
        return any(_holds_tensor(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return any(_holds_tensor(x, depth + 1) for x in obj.values())
    if is_dataclass(obj):
        return any(_holds_tensor(getattr(obj, f.name), depth + 1) for f in fields(obj))
    return any(_holds_tensor(x, depth + 1) for x in getattr(obj, "__dict__", {}).values())


@dataclass(frozen=True)
class _View:
    """A tensor argument as a view of recorded buffer ``buf`` (storage offset in elements)."""
    buf: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Input:
    index: int


@dataclass
class _Buffer:
    nbytes: int
    device: torch.device
    zero: bool  # all zeros when the interface first passed it to a kernel
    integer: bool = False  # seen as an integer tensor: never poisoned


class _Unreplayable(Exception):
    pass


class _Recorder:
    """Builds the record while the interface runs: classifies every tensor argument before its kernel runs."""

    def __init__(self, inputs: Sequence[Tensor]):
        self.inputs = inputs
        self.input_storages = {t.untyped_storage().data_ptr() for t in inputs}
        self.buffers: list[_Buffer] = []
        self.buffer_of: dict[int, int] = {}  # storage pointer -> buffer index
        self.calls: list[tuple[Callable, list]] = []
        # every buffer stays alive until the recording ends, so no freed buffer's address is handed
        # out again and taken for the same buffer
        self.alive: list[Tensor] = []

    def classify(self, t: Tensor):
        for i, x in enumerate(self.inputs):
            if (t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride()
                    and t.dtype == x.dtype):
                return _Input(i)
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.input_storages:
            raise _Unreplayable("a kernel argument is a view of an input other than the input itself")
        if ptr not in self.buffer_of:
            whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            self.buffer_of[ptr] = len(self.buffers)
            self.buffers.append(_Buffer(storage.nbytes(), t.device, bool((whole == 0).all())))
            self.alive.append(whole)
        buf = self.buffer_of[ptr]
        if not (t.dtype.is_floating_point or t.dtype.is_complex):
            self.buffers[buf].integer = True
        return _View(buf, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def spec(self, arg):
        if isinstance(arg, Tensor):
            return self.classify(arg)
        if _holds_tensor(arg):
            raise _Unreplayable(f"a kernel argument of type {type(arg).__name__} holds tensors")
        return arg

    def wrap(self, fn: Callable) -> Callable:
        def recorded(*args, **kwargs):
            if kwargs:
                raise _Unreplayable("a kernel was called with keyword arguments")
            self.calls.append((fn, [self.spec(a) for a in args]))
            return fn(*args)
        return recorded


class _RecordingCache:
    """Stands in for one function's ``compile_cache`` while the interface is recorded."""

    def __init__(self, cache, recorder: _Recorder):
        self._cache, self._recorder = cache, recorder

    def __contains__(self, key) -> bool:
        return key in self._cache

    def __setitem__(self, key, fn) -> None:
        self._cache[key] = fn

    def __getitem__(self, key):
        return self._recorder.wrap(self._cache[key])


@contextlib.contextmanager
def _recording(owners: Sequence[object], recorder: _Recorder):
    saved = [(o, o.compile_cache) for o in owners]
    try:
        for o, cache in saved:
            o.compile_cache = _RecordingCache(cache, recorder)
        yield
    finally:
        for o, cache in saved:
            o.compile_cache = cache


class _Plan:
    """The record, laid out so a replay does little more than allocate buffers and call the kernels."""

    def __init__(self, buffers: list[_Buffer], calls: list[tuple[Callable, list]], outputs: list, n_inputs: int):
        self.buffers = buffers
        self.views: list[_View] = list(dict.fromkeys(
            s for _, specs in calls for s in [*specs, *outputs] if isinstance(s, _View)))
        # a buffer seen only as one tensor over all of it is allocated as that tensor (one call, not two)
        views_of = Counter(v.buf for v in self.views)
        self._whole = {v.buf for v in self.views if views_of[v.buf] == 1 and v.offset == 0
                       and _span_bytes(v) == buffers[v.buf].nbytes}

        def ref(spec):  # an index into [*inputs, *views]
            return spec.index if isinstance(spec, _Input) else n_inputs + self.views.index(spec)

        self.calls = [(fn, [None if isinstance(s, (_Input, _View)) else s for s in specs],
                       [(i, ref(s)) for i, s in enumerate(specs) if isinstance(s, (_Input, _View))])
                      for fn, specs in calls]
        self.outputs = [ref(s) for s in outputs]

    def replay(self, inputs: Sequence[Tensor], poison: int | None = None) -> tuple[Tensor, ...]:
        raw = {}
        for i, b in enumerate(self.buffers):
            if i not in self._whole or poison is not None:
                raw[i] = (torch.zeros if b.zero and poison != i else torch.empty)(b.nbytes, dtype=torch.uint8,
                                                                                  device=b.device)
                if poison == i:
                    raw[i].fill_(0xFF)  # NaN in every floating-point format
        tensors = list(inputs)
        for v in self.views:
            b = self.buffers[v.buf]
            if v.buf in raw:
                tensors.append(torch.empty(0, dtype=v.dtype, device=b.device).set_(
                    raw[v.buf].untyped_storage(), v.offset, v.shape, v.stride))
            else:
                t = torch.empty_strided(v.shape, v.stride, dtype=v.dtype, device=b.device)
                tensors.append(t.zero_() if b.zero else t)
        for fn, args, slots in self.calls:
            args = args.copy()
            for i, r in slots:
                args[i] = tensors[r]
            fn(*args)
        return tuple(tensors[r] for r in self.outputs)


def _span_bytes(v: _View) -> int:
    return (1 + sum((n - 1) * st for n, st in zip(v.shape, v.stride))) * v.dtype.itemsize if all(v.shape) else 0


def _same(got: Sequence[Tensor], want: Sequence[Tensor]) -> bool:
    """Equal up to the order of floating-point atomics (FA4's dq accumulates with them): 1% of the largest value."""
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        a, b = a.double(), b.double()
        if not torch.equal(a.isnan(), b.isnan()):
            return False
        a, b = a.nan_to_num(), b.nan_to_num()
        if (a - b).abs().max() > 1e-2 * b.abs().max():
            return False
    return True


class KernelReplay:
    """Runs ``interface(*inputs)`` (a tuple of tensors out) once per input signature, then its recorded kernels.

    ``owners`` are the objects whose ``compile_cache`` the interface calls its kernels through.
    """

    def __init__(self, owners: Sequence[object], name: str):
        self.owners, self.name = list(owners), name
        # a memo of recordings, like the kernel library's own compile caches: a replay is used only
        # where it reproduced the interface, so results never depend on what is in it
        self._plans: dict[tuple, _Plan | None] = {}

    def __call__(self, interface: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...],
                 extra: tuple = ()) -> tuple[Tensor, ...]:
        key = (extra, torch.is_grad_enabled(), *map(_signature, inputs))
        plan = self._plans.get(key, _MISSING)
        if plan is _MISSING:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return interface(*inputs)  # recording synchronises, which a CUDA graph capture refuses
            out, self._plans[key] = self._record(interface, inputs)
            return out
        return interface(*inputs) if plan is None else plan.replay(inputs)

    def _record(self, interface, inputs):
        recorder = _Recorder(inputs)
        try:
            with _recording(self.owners, recorder):
                out = tuple(interface(*inputs))
            plan = _Plan(recorder.buffers, recorder.calls, [recorder.spec(t) for t in out], len(inputs))
        except _Unreplayable as why:
            log.warning("%s: calling the interface each time at %s (%s)", self.name, _shapes(inputs), why)
            return interface(*inputs), None
        want = out  # every replay writes buffers of its own, so the interface's outputs stay as they are
        if not _same(plan.replay(inputs), want):
            log.warning("%s: calling the interface each time at %s (its kernels replayed gave other outputs)",
                        self.name, _shapes(inputs))
            return out, None
        for i, b in enumerate(plan.buffers):  # zero by chance, not by need: leave it unfilled
            if b.zero and not b.integer and _same(plan.replay(inputs, poison=i), want):
                b.zero = False
        return out, plan


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
