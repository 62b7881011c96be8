"""The execution strategy: which of the two forms of a loss runs, chosen in one place.

* ``"dense"``: the synchronisation-free form. Fixed-shape masks, ``scatter``/``gather``,
  ``topk``/``sort``, never a host read. It is what accelerators run, what ``torch.compile``
  traces and what a CUDA graph captures; it is the reference form.
* ``"gathered"``: where reading a value on the host costs nothing (CPU tensors, eager mode),
  a few steps read a count and work on the rows that carry loss. Each such path exists only
  because it saves at least 10 % of its family's CPU step (the list is kept below, with the
  measured gain), and tests run every parity and property check under both strategies.
* ``"auto"`` (the default): ``"gathered"`` on CPU tensors in eager mode, ``"dense"`` elsewhere.

Under ``torch.compile`` every strategy runs dense. ::

    with detloss.execution_strategy("dense"):
        out = loss_fn(...)            # the accelerator path, on the CPU too
    detloss.set_execution_strategy("auto")

Gathered paths that remain (each measured by a paired A/B in one process; see
``benchmarks/README.md``) are listed in :data:`GATHERED_PATHS`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

STRATEGIES = ("auto", "dense", "gathered")

_strategy = "auto"


def _check(name: str) -> str:
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"execution strategy: expected one of {STRATEGIES}, got {name!r}")
    return name


def set_execution_strategy(name: str) -> None:
    """Choose the execution strategy globally: ``"auto"`` (default), ``"dense"`` or ``"gathered"``."""
    global _strategy
    _strategy = _check(name)


def get_execution_strategy() -> str:
    """The execution strategy in force: ``"auto"``, ``"dense"`` or ``"gathered"``."""
    return _strategy


@contextlib.contextmanager
def execution_strategy(name: str) -> Iterator[None]:
    """Run the enclosed code under strategy ``name``; the previous one is restored on exit."""
    global _strategy
    previous = _strategy
    _strategy = _check(name)
    try:
        yield
    finally:
        _strategy = previous


def host_sync_is_free(x: Tensor) -> bool:
    """True where the gathered form of a step runs: a CPU tensor ``x``, eager mode, and a
    strategy other than ``"dense"``.

    ``"gathered"`` cannot make a host read free on an accelerator or inside ``torch.compile``,
    so there it runs dense too.
    """
    if _strategy == "dense":
        return False
    return x.device.type == "cpu" and not torch.compiler.is_compiling()
