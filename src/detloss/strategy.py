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

The gathered paths that remain, each kept because replacing it alone by its dense form slows
its family's CPU forward + backward by more than the 10 % bar (``benchmarks/ab_gathered_paths.py``:
paired A/B, alternating rounds in one process; the measured slowdowns, with the machine they
came from, are in ``benchmarks/README.md``):

* ``functional.selection.RowSelection``: the SSD / RetinaFace box and class terms on the
  gathered rows that carry loss (positives and mined negatives, ~4 % of the priors) instead of
  masks over every prior.
* ``functional.multibox.mined_cross_entropy``: negatives ranked by a no-grad ``exp`` + BLAS
  log-sum-exp (:func:`detloss.functional.classification.class_cross_entropy_no_grad`), the
  differentiable cross-entropy only on the gathered rows.
* ``_memory.new_like``: head-sized CPU gradients above 32 MiB allocated by NumPy (``calloc``:
  no page-by-page faulting and second clearing of a fresh mapping).
* ``sampling.hard_negative.top_k_mask``: hard negatives by one ``topk`` per group of images of
  similar counts (``detloss._grouping``) instead of the radix select.
* ``matching.task_aligned``: each GT chunk's CIoU and metric on its candidate pairs only
  (below the bar at 10 objects per image, far above it at 100 and 1000, never slower).

Deleted because they stayed below the bar (same harness): the matcher's GT compaction, count
grouping and has-GT skip with the IoU kernel's skipped degenerate rule (SSD +2 %, RetinaFace
+9 % together), the YOLOv3 ignore-IoU row compaction (+3-8 %), YOLOv3's gathered candidates
(+1-2 %) and its one-pass bit-masked objectness gradient (about 3 %).
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
