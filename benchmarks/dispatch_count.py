"""Count what one training step dispatches: aten operators (a proxy for GPU kernel launches)
and host synchronisations (must be 0 on the dense path).

A host synchronisation is an operator whose result the host must wait for: a value read back
(``_local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``), or an output whose shape
depends on the data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``...).
A tensor the library builds from Python numbers (``lift_fresh``) is counted as a blocking
host-to-device copy, which on an accelerator ends in a stream synchronisation, unless
:func:`detloss._constants.device_constant` builds it (a non-blocking copy there).

    from dispatch_count import count_dispatch
    with detloss.execution_strategy("dense"):
        counts = count_dispatch(step)           # counts.ops, counts.syncs, counts.sync_ops
        print(describe_dense(step))             # with the CPU's and an accelerator's chunk sizes

Chunked passes take cache-sized chunks on the CPU and large ones on accelerators
(:mod:`detloss._chunking`); :func:`accelerator_chunks` counts a CPU run as an accelerator's.
"""
from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import detloss
from detloss import _chunking
from torch.utils._python_dispatch import TorchDispatchMode

LIBRARY_DIR = Path(detloss.__file__).resolve().parent  # the package folder: what counts as library code

# operators whose result the host waits for (value reads and data-dependent output shapes)
SYNC_OPS = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
    "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "repeat_interleave",
    "masked_scatter", "_assert_async",
}


@dataclass
class DispatchCounts:
    ops: int = 0
    syncs: int = 0
    sync_ops: Counter = field(default_factory=Counter)
    by_op: Counter = field(default_factory=Counter)
    blocking_copies: Counter = field(default_factory=Counter)  # "file:line" of each


def _library_site(func) -> str | None:
    """``file:line`` of the library code that built a tensor from Python numbers, or None when the
    library did not (the step's own inputs) or built it through ``device_constant``."""
    if func.overloadpacket.__name__ not in ("lift_fresh", "lift_fresh_copy"):
        return None
    frames = [f for f in traceback.extract_stack() if _in_library(f.filename)]
    if not frames or frames[-1].filename.endswith("_constants.py"):
        return None
    return f"{Path(frames[-1].filename).resolve().relative_to(LIBRARY_DIR).as_posix()}:{frames[-1].lineno}"


def _in_library(filename: str) -> bool:
    """Whether ``filename`` belongs to the detloss package itself (its folder, wherever the
    checkout lives: a clone in a folder named ``detloss`` must not count its benchmarks)."""
    return Path(filename).resolve().is_relative_to(LIBRARY_DIR)


def _is_sync(func, args) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return not (name == "repeat_interleave" and "output_size" in str(func._schema) and len(args) > 2)
    if name in ("index", "index_put", "index_put_"):  # boolean-mask indexing: data-dependent size
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


class _Counter(TorchDispatchMode):
    def __init__(self, counts: DispatchCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts.ops += 1
        self.counts.by_op[name] += 1
        if _is_sync(func, args):
            self.counts.syncs += 1
            self.counts.sync_ops[name] += 1
        site = _library_site(func)
        if site:
            self.counts.blocking_copies[site] += 1
        return func(*args, **(kwargs or {}))


def count_dispatch(step: Callable[[], None]) -> DispatchCounts:
    """Run ``step()`` once (forward + backward) and count its dispatched operators and syncs."""
    counts = DispatchCounts()
    with _Counter(counts):
        step()
    return counts


def describe(counts: DispatchCounts, accelerator_ops: int | None = None) -> str:
    """One line: operators (and, when given, the count with an accelerator's chunk sizes), host
    synchronisations and blocking copies, each with where it came from."""
    ops = f"{counts.ops} ops/step" + (f" ({accelerator_ops} with an accelerator's chunk sizes)" if accelerator_ops is not None else "")
    syncs = ", ".join(f"{k} x{v}" for k, v in counts.sync_ops.most_common()) or "none"
    copies = ", ".join(f"{k} x{v}" for k, v in counts.blocking_copies.most_common())
    copies = f"{sum(counts.blocking_copies.values())} blocking host-to-device copies" + (f" ({copies})" if copies else "")
    return f"{ops}, {counts.syncs} host syncs ({syncs}), {copies}"


@contextmanager
def accelerator_chunks() -> Iterator[None]:
    """Inside, chunked passes on the CPU take the chunk sizes they take on accelerators."""
    original = _chunking.cache_sized
    _chunking.cache_sized = lambda _device: False
    try:
        yield
    finally:
        _chunking.cache_sized = original


def describe_dense(step: Callable[[], None]) -> str:
    """Operators of one ``step()`` with the CPU's and with an accelerator's chunk sizes, and its
    host synchronisations (run it under the dense strategy, value checks off)."""
    step()  # once first: what a loss builds once and keeps (decode constants) is not per step
    cpu = count_dispatch(step)
    with accelerator_chunks():
        accelerator = count_dispatch(step)
    return describe(cpu, accelerator.ops)
