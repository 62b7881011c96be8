"""Input validation shared by every public entry point.

The rule: **bad data raises; a diverging model gives NaN.**

* **Metadata checks** (type, rank, shape, dtype) read only tensor metadata. They are free,
  never synchronise with the device and always run, on every argument.
* **Value checks** (NaN/inf, label ranges, normalised coordinates, box order) read tensor
  data, and only of what the user hands in as data: ground truth, priors, anchors. An entry
  point collects all of its value checks in one :class:`ValueChecks` and reads their verdict
  on the host **once** (on a GPU, one synchronisation per forward); only when a check failed
  does it read more, to name the failure. They can be switched off with
  :func:`detloss.set_value_checks` (``False``) and are skipped automatically while
  ``torch.compile`` traces and while a CUDA graph is being captured.
* **Predictions are never read on the host**, nor anything computed from them. A non-finite
  prediction (an fp16 overflow under autocast) gives a non-finite loss, never an exception and
  never a crashed matcher, so ``torch.amp.GradScaler`` can skip the step.

Every error names the argument, what was expected and what was received.
"""
from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Optional, Union

import torch
from torch import Tensor

DimSpec = Union[int, str, None]

_value_checks_enabled = True


def value_checks_enabled() -> bool:
    """Whether value checks are switched on (:func:`set_value_checks`)."""
    return _value_checks_enabled


def set_value_checks(enabled: bool) -> None:
    """Turn the data-reading input checks (NaN/inf, label ranges) on or off globally.

    They are on by default and cost one host read per forward (see the module doc). Turn them
    off to save that read on a GPU; metadata checks (shapes, dtypes) always run. They are off
    by themselves under ``torch.compile`` and CUDA-graph capture.
    """
    global _value_checks_enabled
    _value_checks_enabled = bool(enabled)


def value_checks_active() -> bool:
    """Whether data-reading checks run now (enabled, not compiling, not capturing)."""
    if not _value_checks_enabled:
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def require_tensor(x: Any, name: str) -> Tensor:
    """Return ``x`` if it is a tensor, else raise ``TypeError`` naming ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _format_spec(spec: Sequence[DimSpec], dims: Mapping[str, int]) -> str:
    parts = []
    for d in spec:
        if d is None:
            parts.append("*")
        elif isinstance(d, str) and d in dims:
            parts.append(f"{d}={dims[d]}")
        else:
            parts.append(str(d))
    return "(" + ", ".join(parts) + ")"


def require_shape(
    x: Tensor,
    name: str,
    spec: Sequence[DimSpec],
    dims: Optional[dict[str, int]] = None,
) -> dict[str, int]:
    """Check ``x.shape`` against ``spec`` and bind symbolic sizes.

    ``spec`` lists one entry per dimension: an ``int`` (exact size), a ``str`` (a symbolic
    size such as ``"B"``; the first tensor that uses a symbol binds it, later ones must
    agree) or ``None`` (any size). ``dims`` carries the bindings between calls and is
    returned. Raises ``ValueError`` naming ``name``, the expected and the received shape.
    """
    require_tensor(x, name)
    dims = {} if dims is None else dims
    shape = tuple(x.shape)
    ok = len(shape) == len(spec)
    if ok:
        for size, d in zip(shape, spec):
            if isinstance(d, int) and size != d:
                ok = False
            elif isinstance(d, str) and d in dims and dims[d] != size:
                ok = False
    if not ok:
        raise ValueError(
            f"{name}: expected shape {_format_spec(spec, dims)}, got {shape}"
        )
    for size, d in zip(shape, spec):
        if isinstance(d, str):
            dims.setdefault(d, size)
    return dims


def broadcast_shape(*shapes: Sequence[int]) -> Optional[tuple[int, ...]]:
    """The shape ``shapes`` broadcast to (NumPy's rules), or None when they do not broadcast.

    Plain Python on the sizes: ``torch.broadcast_shapes`` costs about 40 us a call, which
    every loss call would pay for a metadata check.

    >>> broadcast_shape((8, 1), (3,)), broadcast_shape((2,), (3,))
    ((8, 3), None)
    """
    out: list[int] = []
    for sizes in itertools.zip_longest(*(reversed(tuple(s)) for s in shapes), fillvalue=1):
        wide = {int(v) for v in sizes} - {1}
        if len(wide) > 1:
            return None
        out.append(wide.pop() if wide else 1)
    return tuple(reversed(out))


def require_same_shape(x: Any, name: str, like: Tensor, like_name: str) -> Tensor:
    """Raise unless ``x`` is a tensor with the shape of ``like``; returns ``x``.

    The message names both: ``"target: expected the shape of input (2, 4), got (2, 3)"``.
    """
    require_tensor(x, name)
    if x.shape != like.shape:
        raise ValueError(f"{name}: expected the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}")
    return x


def require_floating(x: Tensor, name: str) -> Tensor:
    """Raise ``TypeError`` unless ``x`` has a floating-point dtype."""
    require_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def require_integer(x: Tensor, name: str) -> Tensor:
    """Raise ``TypeError`` unless ``x`` has an integer dtype (bool is not an integer here)."""
    require_tensor(x, name)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    return x


def as_bool_mask(x: Tensor, name: str) -> Tensor:
    """Return ``x`` as a bool tensor; accepts bool or integer 0/1 masks, else ``TypeError``."""
    require_tensor(x, name)
    if x.dtype == torch.bool:
        return x
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name}: expected a bool (or 0/1 integer) mask, got dtype {x.dtype}")
    return x != 0


#: how far outside ``[0, 1]`` a normalised box centre may lie (:meth:`ValueChecks.normalised`)
NORMALISED_CENTRE_SLACK = 0.5


class ValueChecks:
    """The value checks of one entry point, read on the host once.

    Each check queues a 0-d bool tensor saying whether it failed (device work, no read) and a
    function that describes the failure. :meth:`run` reads whether any failed with **one**
    host read and, only then, names the first failure (more reads, on the error path only).
    Checks are queued only while :func:`value_checks_active`; every method returns ``self``.

    >>> boxes, labels = torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([7])
    >>> ValueChecks().finite(boxes, "gt_boxes").in_range(labels, "gt_labels", 0, 4).run()
    Traceback (most recent call last):
    ...
    ValueError: gt_labels: expected values in [0, 4], got min 7 and max 7
    """

    def __init__(self) -> None:
        self.active = value_checks_active()
        self._failed: list[Tensor] = []
        self._describe: list[Callable[[], str]] = []
        #: ``(name, kind)`` of every queued check, in order (what a forward validated)
        self.checked: list[tuple[str, str]] = []

    def condition(self, failed: Tensor, name: str, kind: str, describe: Callable[[], str]) -> "ValueChecks":
        """Queue a check of argument ``name``: ``failed`` is a 0-d bool tensor (True: bad), and
        ``describe()`` returns the error message (it may read tensors; it runs only on failure)."""
        if self.active:
            self._failed.append(failed.reshape(()))
            self._describe.append(describe)
            self.checked.append((name, kind))
        return self

    def finite(self, x: Tensor, name: str) -> "ValueChecks":
        """``x`` holds no NaN or inf."""
        if not self.active or not x.is_floating_point() or x.numel() == 0:
            return self

        def describe() -> str:
            return f"{name}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN/inf entries"

        return self.condition(~torch.isfinite(x).all(), name, "finite", describe)

    def in_range(
        self, x: Tensor, name: str, low: Optional[float], high: Optional[float], where: Optional[Tensor] = None
    ) -> "ValueChecks":
        """``low <= x <= high`` (``None`` leaves a side open), over the entries where ``where`` is
        True: a bool mask over the leading dimensions of ``x`` (``(B, M)`` for ``(B, M, 2)``)."""
        if not self.active or x.numel() == 0 or (low is None and high is None):
            return self
        if where is not None:
            where = where.reshape(where.shape + (1,) * (x.dim() - where.dim()))
        outside = torch.zeros_like(x, dtype=torch.bool)
        if low is not None:
            outside |= x < low
        if high is not None:
            outside |= x > high
        if where is not None:
            outside &= where

        def describe() -> str:
            values = x if where is None else x[where.expand_as(x)]
            lo_txt = "-inf" if low is None else f"{low:g}"
            hi_txt = "inf" if high is None else f"{high:g}"
            return (
                f"{name}: expected values in [{lo_txt}, {hi_txt}], "
                f"got min {float(values.min()):g} and max {float(values.max()):g}"
            )

        return self.condition(outside.any(), name, "range", describe)

    def normalised(
        self,
        boxes: Tensor,
        name: str,
        *,
        box_format: str = "xyxy",
        where: Optional[Tensor] = None,
        positive_size: bool = False,
    ) -> "ValueChecks":
        """``boxes (..., 4)`` look normalised, not pixels.

        What tells normalised boxes from pixel boxes is where they are, not how large: every
        centre must lie within ``[-0.5, 1.5]`` (a box may stick out of the image after
        augmentation, and a prior or an anchor may be several times the image: RetinaFace's
        512 px priors are 1.6 image widths at 320 px). Pixel boxes, with centres in the tens
        or hundreds, get a message that suggests normalising them. ``box_format`` is
        ``"xyxy"`` or ``"cxcywh"``; ``where`` an optional bool mask over ``boxes.shape[:-1]``;
        with ``positive_size`` widths and heights must be ``> 0`` (priors: the coder divides
        by them).
        """
        if not self.active or boxes.numel() == 0:
            return self
        if box_format == "xyxy":
            centres, sizes = (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]
        else:
            centres, sizes = boxes[..., :2], boxes[..., 2:]
        rows = None if where is None else where.unsqueeze(-1)

        def pick(values: Tensor) -> Tensor:
            return values if rows is None else values[rows.expand_as(values)]

        far = (centres < -NORMALISED_CENTRE_SLACK) | (centres > 1 + NORMALISED_CENTRE_SLACK)
        self.condition(
            (far if rows is None else far & rows).any(), name, "normalised",
            lambda: f"{name}: expected normalised coordinates (box centres about [0, 1]), got centres from "
            f"{float(pick(centres).min()):g} to {float(pick(centres).max()):g}; divide pixel boxes by the "
            "image width and height",
        )
        if positive_size:
            flat = ~(sizes > 0)
            self.condition(
                (flat if rows is None else flat & rows).any(), name, "positive size",
                lambda: f"{name}: expected widths and heights > 0 ({box_format}), got a smallest one of "
                f"{float(pick(sizes).min()):g}",
            )
        return self

    def run(self, also: Optional[Tensor] = None) -> Optional[int]:
        """Read the verdict of every queued check with one host read; raise ``ValueError`` with
        the message of the first failed check. The queue is emptied.

        Inside :func:`joined_value_checks`, the checks queued on the block's own
        :class:`ValueChecks` are read here too, first.

        ``also``: an optional 0-d non-negative integer tensor read in the same host read (a
        count the caller needs on the host anyway); its value is returned.
        """
        joined = _JOINED.get() if self.active else None  # inactive under torch.compile: no lookup to trace
        if joined is not None and joined is not self:
            self._failed, self._describe = joined._failed + self._failed, joined._describe + self._describe
            joined._failed, joined._describe = [], []
        flags, describe, self._failed, self._describe = self._failed, self._describe, [], []
        if not flags:
            return None if also is None else int(also)
        failed = torch.stack(flags).any()
        if also is None:
            bad, also_value = bool(failed), None
        else:  # one read of both: 2 * also + failed
            packed = int(also.to(torch.int64) * 2 + failed.to(torch.int64))
            bad, also_value = bool(packed & 1), packed >> 1
        if bad:  # the error path: find and name the first failure
            for flag, message in zip(flags, describe):
                if bool(flag):
                    raise ValueError(message())
        return also_value


_JOINED: ContextVar[Optional[ValueChecks]] = ContextVar("detloss_joined_value_checks", default=None)


@contextmanager
def joined_value_checks() -> Iterator[ValueChecks]:
    """A :class:`ValueChecks` whose checks are read by the next :meth:`ValueChecks.run` inside
    the block, in the same host read (or at the block's end if none runs).

    What a wrapper checks before it calls a loss (a drop-in converting the original's inputs)
    then costs no read of its own: the loss's one read covers both.
    """
    checks = ValueChecks()
    token = _JOINED.set(checks)
    try:
        yield checks
    finally:
        _JOINED.reset(token)
    checks.run()


def require_finite(x: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` if ``x`` holds NaN or inf (a value check: see the module doc)."""
    ValueChecks().finite(x, name).run()
    return x


def require_range(
    x: Tensor,
    name: str,
    low: Optional[float],
    high: Optional[float],
    where: Optional[Tensor] = None,
) -> Tensor:
    """Raise ``ValueError`` unless ``low <= x <= high`` (over ``where`` if given).

    A value check (see the module doc); ``None`` leaves that side open.
    """
    ValueChecks().in_range(x, name, low, high, where).run()
    return x


def require_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def require_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """Raise ``ValueError`` unless the scalar ``value`` is > 0 (or >= 0 with ``allow_zero``).

    Any real number is accepted (Python or NumPy scalars, not bool); NaN is rejected.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not value == value or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a number {bound}, got {value!r}")
    return value


def require_int(value: Any, name: str, *, minimum: Optional[int] = None, note: str = "") -> int:
    """Raise ``ValueError`` unless ``value`` is an integer (not bool) ``>= minimum``; returns it
    as an ``int``. ``note`` is added to the message (``"(background included)"``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name}: expected an integer{bound}{' ' + note if note else ''}, got {value!r}")
    return int(value)


def require_boxes(x: Any, name: str, *, ndim: Optional[int] = None) -> Tensor:
    """Check that ``x`` is a floating-point box tensor with last dimension 4 (and rank ``ndim``
    when given); metadata only. Returns ``x``."""
    require_tensor(x, name)
    if x.dim() == 0 or x.shape[-1] != 4 or (ndim is not None and x.dim() != ndim):
        expected = "(..., 4)" if ndim is None else "(" + ", ".join(["*"] * (ndim - 1) + ["4"]) + ")"
        raise ValueError(f"{name}: expected boxes of shape {expected}, got {tuple(x.shape)}")
    require_floating(x, name)
    return x


def require_padded_gt(
    gt_boxes: Tensor,
    gt_valid: Tensor,
    gt_labels: Optional[Tensor] = None,
    *,
    checks: ValueChecks,
    dims: Optional[dict[str, int]] = None,
    label_range: Optional[tuple[int, int]] = None,
    box_dims: int = 4,
) -> tuple[dict[str, int], Tensor]:
    """Check padded ground truth: ``gt_boxes (B, M, box_dims)`` floating point, ``gt_valid
    (B, M)`` bool (or 0/1) and optional ``gt_labels (B, M)`` integers, against each other and
    the sizes already bound in ``dims``; returns ``(dims, gt_valid as bool)``.

    Queues on ``checks``: ``gt_boxes`` finite and, with ``label_range``, the labels of valid
    rows within it (the caller runs the checks, once, with the rest of its own).
    """
    require_tensor(gt_boxes, "gt_boxes")
    require_floating(gt_boxes, "gt_boxes")
    dims = require_shape(gt_boxes, "gt_boxes", ("B", "M", box_dims), dims)
    gt_valid = as_bool_mask(gt_valid, "gt_valid")
    require_shape(gt_valid, "gt_valid", ("B", "M"), dims)
    checks.finite(gt_boxes, "gt_boxes")
    if gt_labels is not None:
        require_integer(gt_labels, "gt_labels")
        require_shape(gt_labels, "gt_labels", ("B", "M"), dims)
        if label_range is not None:
            checks.in_range(gt_labels, "gt_labels", *label_range, where=gt_valid)
    return dims, gt_valid


def require_normalised(
    boxes: Tensor,
    name: str,
    *,
    box_format: str = "xyxy",
    where: Optional[Tensor] = None,
    positive_size: bool = False,
) -> Tensor:
    """Raise ``ValueError`` unless ``boxes (..., 4)`` look normalised (one value check; see
    :meth:`ValueChecks.normalised`)."""
    ValueChecks().normalised(boxes, name, box_format=box_format, where=where, positive_size=positive_size).run()
    return boxes
