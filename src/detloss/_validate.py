"""Input validation shared by every public entry point.

Two kinds of checks:

* **Metadata checks** (type, rank, shape, dtype) read only tensor metadata. They are free,
  never synchronise with the device and always run.
* **Value checks** (NaN/inf, label ranges) read tensor data. On a GPU that is one host
  synchronisation per check, so they can be switched off with
  :func:`detloss.set_value_checks` (``False``), and they are skipped automatically while
  ``torch.compile`` traces and while a CUDA graph is being captured.

Every error names the argument, what was expected and what was received.
"""
from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

DimSpec = Union[int, str, None]

_value_checks_enabled = True


def set_value_checks(enabled: bool) -> None:
    """Turn the data-reading input checks (NaN/inf, label ranges) on or off globally.

    They are on by default. Turn them off for CUDA-graph capture or to save the one
    host synchronisation per check on a GPU; metadata checks (shapes, dtypes) always run.
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


def require_finite(x: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` if ``x`` holds NaN or inf (a value check: see module doc).

    A finite sum proves every entry finite, so one summation decides the usual case; only a
    non-finite sum (NaN/inf, or finite values whose sum overflows) runs the exact check.
    """
    if value_checks_active() and x.is_floating_point() and x.numel() > 0:
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            n_bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{name}: expected finite values, got {n_bad} NaN/inf entries")
    return x


def require_range(
    x: Tensor,
    name: str,
    low: Optional[float],
    high: Optional[float],
    where: Optional[Tensor] = None,
) -> Tensor:
    """Raise ``ValueError`` unless ``low <= x <= high`` (over ``where`` if given).

    A value check (see module doc); ``None`` leaves that side open.
    """
    if not value_checks_active() or x.numel() == 0:
        return x
    values = x if where is None else x[where]
    if values.numel() == 0:
        return x
    lo, hi = values.min(), values.max()
    bad = (low is not None and bool(lo < low)) or (high is not None and bool(hi > high))
    if bad:
        lo_txt = "-inf" if low is None else f"{low:g}"
        hi_txt = "inf" if high is None else f"{high:g}"
        raise ValueError(
            f"{name}: expected values in [{lo_txt}, {hi_txt}], "
            f"got min {float(lo):g} and max {float(hi):g}"
        )
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
    """Check a box tensor: a floating-point tensor with last dimension 4 and finite values.

    ``ndim`` fixes the rank when given. Returns ``x``.
    """
    require_tensor(x, name)
    if x.dim() == 0 or x.shape[-1] != 4 or (ndim is not None and x.dim() != ndim):
        expected = "(..., 4)" if ndim is None else "(" + ", ".join(["*"] * (ndim - 1) + ["4"]) + ")"
        raise ValueError(f"{name}: expected boxes of shape {expected}, got {tuple(x.shape)}")
    require_floating(x, name)
    require_finite(x, name)
    return x


NORMALISED_CENTRE_SLACK = 0.5


def require_normalised(
    boxes: Tensor,
    name: str,
    *,
    box_format: str = "xyxy",
    where: Optional[Tensor] = None,
    positive_size: bool = False,
) -> Tensor:
    """Raise ``ValueError`` unless ``boxes (..., 4)`` look normalised (a value check).

    What tells normalised boxes from pixel boxes is where they are, not how large: every
    centre must lie within ``[-0.5, 1.5]`` (a box may stick out of the image after
    augmentation, and a prior or an anchor may be several times the image: RetinaFace's
    512 px priors are 1.6 image widths at 320 px). Pixel boxes, with centres in the tens or
    hundreds, get a message that suggests normalising them. ``box_format`` is ``"xyxy"`` or
    ``"cxcywh"``; ``where`` an optional bool mask over ``boxes.shape[:-1]``; with
    ``positive_size`` widths and heights must be ``> 0`` (priors: the coder divides by them).
    """
    if not value_checks_active() or boxes.numel() == 0:
        return boxes
    values = boxes if where is None else boxes[where]
    if values.numel() == 0:
        return boxes
    if box_format == "xyxy":
        centres, sizes = (values[..., :2] + values[..., 2:]) / 2, values[..., 2:] - values[..., :2]
    else:
        centres, sizes = values[..., :2], values[..., 2:]
    lo, hi = float(centres.min()), float(centres.max())
    if lo < -NORMALISED_CENTRE_SLACK or hi > 1 + NORMALISED_CENTRE_SLACK:
        raise ValueError(
            f"{name}: expected normalised coordinates (box centres about [0, 1]), got centres from {lo:g} "
            f"to {hi:g}; divide pixel boxes by the image width and height"
        )
    if positive_size and not bool((sizes > 0).all()):
        raise ValueError(
            f"{name}: expected widths and heights > 0 ({box_format}), got a smallest one of {float(sizes.min()):g}"
        )
    return boxes
