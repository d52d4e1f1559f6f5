"""KernelReplay (neox/model/kernel_replay.py) against the interface it replays.

A stand-in for a kernel library: its "kernels" are callables kept in a per-function ``compile_cache``, as
FlashAttention-4 keeps its compiled kernels, and its interface allocates buffers and calls them. Every
replayed result is held against plain torch math and against the interface's own result on the same
inputs. FA4 itself is held on the H200 by tests/gpu/test_flash_gpu.py.
"""

from __future__ import annotations

import logging

import torch

from neox.model.kernel_replay import KernelReplay


def k_scale(x, out, s):  # writes its whole output
    out.copy_(x * s)


def k_accumulate(x, acc):  # adds into an accumulator it expects zeroed
    acc.view(x.shape).add_(x).add_(x)


def k_shift(acc, scratch):  # overwrites a buffer the interface happened to zero-fill
    scratch.copy_(acc + 1)


def k_count(counter):  # an integer buffer (a semaphore, say) that must start at zero
    counter.add_(1)


def k_convert(scratch, out):
    out.copy_((scratch - 1).view(out.shape).to(out.dtype))


class Library:
    """One interface with its own kernel cache; ``calls`` counts how often its Python ran."""

    def __init__(self, outside_op: bool = False, packed: bool = False):
        self.calls = 0

        def fwd(x: torch.Tensor, s: float):
            self.calls += 1
            cache = fwd.compile_cache
            out = torch.empty_like(x)
            cache["scale"](x.detach(), out, s)
            acc = torch.zeros(x.numel(), dtype=torch.float64)
            cache["accumulate"]((x,) if packed else x, acc)
            scratch = torch.zeros(x.numel(), dtype=torch.float64)
            cache["shift"](acc, scratch)
            counter = torch.zeros(1, dtype=torch.int32)
            cache["count"](counter)
            twice = torch.empty_like(x)
            cache["convert"](scratch, twice)
            if outside_op:
                twice.add_(1)  # work outside the kernel caches, which a replay cannot see
            return out, twice, counter

        def accumulate(x, acc):
            k_accumulate(x[0] if packed else x, acc)

        fwd.compile_cache = {"scale": k_scale, "accumulate": accumulate, "shift": k_shift, "count": k_count,
                             "convert": k_convert}
        self.fwd = fwd
        self.replay = KernelReplay([fwd], "test library")

    def __call__(self, x: torch.Tensor, s: float = 0.5):
        return self.replay(lambda x: self.fwd(x, s), (x,), (s,))


def expected(x, s=0.5):
    acc = x.double() + x.double()
    return x * s, (acc + 1 - 1).to(x.dtype), torch.ones(1, dtype=torch.int32)


def same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_replay_matches_the_interface_and_skips_its_python():
    lib = Library()
    for seed in range(4):
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed))
        got = lib(x)
        same(got, expected(x))
        same(got, lib.fwd(x, 0.5))
    # the recording call and the four direct comparisons: the three later calls never entered the interface
    assert lib.calls == 5


def test_zero_fill_kept_where_needed_and_dropped_where_not():
    lib = Library()
    lib(torch.randn(4, 4))
    (plan,) = lib.replay._plans.values()
    # buffers in the order the kernels first saw them: out, the accumulator, the scratch, the counter, twice
    assert [b.zero for b in plan.buffers] == [False, True, False, True, False]
    assert [b.integer for b in plan.buffers] == [False, False, False, True, False]
    x = torch.randn(4, 4)
    same(lib(x), expected(x))


def test_new_shape_dtype_or_alignment_records_again():
    lib = Library()
    base = torch.randn(17)
    # the last: the same shape and strides as the first, its pointer 4 bytes off the allocator's alignment
    inputs = [torch.randn(4, 4), torch.randn(2, 8), torch.randn(4, 4, dtype=torch.float64), base[1:].view(4, 4)]
    for x in inputs + inputs:
        same(lib(x), expected(x))
    assert len(lib.replay._plans) == 4 and None not in lib.replay._plans.values()
    assert lib.calls == 4  # one recording call a signature; the second round was all replays


def test_work_outside_the_caches_falls_back_to_the_interface(caplog):
    lib = Library(outside_op=True)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            x = torch.randn(4, 4)
            out, twice, counter = lib(x)
            torch.testing.assert_close(twice, expected(x)[1] + 1)
    assert lib.calls == 3 and list(lib.replay._plans.values()) == [None]
    assert sum("calling the interface each time" in r.message for r in caplog.records) == 1


def test_a_tensor_packed_in_an_argument_falls_back(caplog):
    lib = Library(packed=True)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            x = torch.randn(4, 4)
            same(lib(x), expected(x))
    assert list(lib.replay._plans.values()) == [None] and "holds tensors" in caplog.text
    assert type(lib.fwd.compile_cache) is dict  # the library's own cache again after recording
