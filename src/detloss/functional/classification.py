"""Classification losses: softmax cross-entropy, binary cross-entropy, sigmoid and softmax focal.

All take raw logits, compute in float32 (float64 stays float64) with log-sum-exp /
log-sigmoid formulations that do not overflow at large logits, and reduce through
:func:`detloss.functional.weighted_reduce`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._chunking import CROSS_ENTROPY_ROWS, LOGSUMEXP_ROWS, chunk_elements
from .._ties import at_least
from .._validate import require_floating, require_integer, require_positive, require_same_shape
from ..boxes import accumulate_dtype, compute_dtype
from .reduce import Reduction, require_weight_shape, weighted_reduce


def _acc(x: Tensor) -> Tensor:
    return x.to(accumulate_dtype(x))


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Row-wise softmax cross-entropy ``(N, C), (N,), (N,) -> (N,)`` with a fused backward.

    Forward: ``-log_softmax(x)[target]`` where ``keep``, else 0, in float32 (float64 stays
    float64); the same kernel and value as autograd's ``log_softmax`` + ``gather``. Backward:
    ``g * (softmax - onehot)`` written once, chunk by chunk over rows (``exp`` and the
    multiplication while the chunk is in cache), instead of autograd's gather-scatter plus
    log-softmax backward over the whole tensor. Rows that are not kept or receive a zero
    gradient get exactly 0. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, keep: Tensor) -> Tensor:
        log_prob = torch.log_softmax(_acc(logits), dim=-1)
        ctx.save_for_backward(log_prob, target, keep)
        ctx.logits_dtype = logits.dtype
        return torch.where(keep, -log_prob.gather(1, target.unsqueeze(1)).squeeze(1), 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        log_prob, target, keep = ctx.saved_tensors
        g = torch.where(keep, grad_loss.to(log_prob.dtype), 0.0).unsqueeze(1)
        grad = torch.empty_like(log_prob)
        step = max(1, chunk_elements(log_prob.device, CROSS_ENTROPY_ROWS) // max(log_prob.shape[1], 1))
        for start in range(0, log_prob.shape[0], step):
            out = grad[start : start + step]
            torch.exp(log_prob[start : start + step], out=out)
            out.mul_(g[start : start + step])
        grad.scatter_add_(1, target.unsqueeze(1), -g)
        return grad.to(ctx.logits_dtype), None, None


def class_cross_entropy_no_grad(logits: Tensor, target_class: int) -> Tensor:
    """``logsumexp(logits) - logits[..., target_class]`` of ``logits (..., C)`` -> ``(...)``:
    every row's softmax cross-entropy against one class, without autograd.

    For ranking (hard negative mining ranks priors by their background cross-entropy) on the
    CPU: ``exp`` and a BLAS matrix-vector sum, chunk by chunk through one cache-sized buffer,
    because ``torch.logsumexp`` is slow over short rows (21 classes; benchmarks/README.md). Without the max shift a row overflows
    when a logit exceeds ~88 and loses accuracy when all of its logits are below ~-87
    (float32); both show in the row sums, and then the stable ``torch.logsumexp`` is used
    instead. Reads the sums on the host (free on the CPU). Computed in float32 (float64 stays
    float64); NaN propagates.
    """
    x = _acc(logits).detach()
    if x.numel() == 0:
        return x.new_zeros(x.shape[:-1])
    flat = x.reshape(-1, x.shape[-1])
    rows, classes = flat.shape
    step = max(1, chunk_elements(flat.device, LOGSUMEXP_ROWS) // classes)
    ones = flat.new_ones(classes)
    buffer = flat.new_empty(min(step, rows), classes)
    total = flat.new_empty(rows)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        torch.mv(torch.exp(flat[start:stop], out=buffer[: stop - start]), ones, out=total[start:stop])
    target = flat[:, target_class].contiguous()  # one strided gather: cheaper than subtracting the strided view
    # every term finite and the largest one a normal float: each is exact to an ulp
    smallest_safe = torch.finfo(flat.dtype).tiny * classes
    if bool((total.min() >= smallest_safe) & (total.max() < float("inf"))):
        lse = total.log_()
    else:
        lse = torch.logsumexp(flat, dim=-1)
    return lse.sub_(target).view(x.shape[:-1])


def _check_pair(logits: Tensor, targets: Tensor, names: tuple[str, str] = ("logits", "targets")) -> None:
    require_floating(logits, names[0])
    require_same_shape(targets, names[1], logits, names[0])


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Softmax cross-entropy of ``logits (..., C)`` against class indices ``target (...)``.

    Entries whose target equals ``ignore_index`` contribute exactly 0 and are left out of
    the ``"mean"`` divisor (as are zero-weight entries). Targets outside ``[0, C)`` other
    than ``ignore_index`` are an error of the caller; they are clamped, not checked, here
    so the loss stays free of host synchronisation.

    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    >>> cross_entropy(logits, torch.tensor([0, -100]), reduction="none")
    tensor([0.2413, 0.0000])
    """
    require_floating(logits, "logits")
    require_integer(target, "target")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"target: expected shape {tuple(logits.shape[:-1])} (logits without the class "
            f"dimension), got {tuple(target.shape)}"
        )
    require_weight_shape(weight, target.shape)
    keep = target != ignore_index
    safe_target = torch.where(keep, target, 0).clamp(0, logits.shape[-1] - 1)
    loss = _SoftmaxCrossEntropy.apply(
        logits.reshape(-1, logits.shape[-1]), safe_target.reshape(-1), keep.reshape(-1)
    ).view(target.shape)
    if weight is None and reduction == "none" and normalizer is None:
        return loss  # ignored entries are already exactly 0
    weight = keep if weight is None else keep.to(loss.dtype) * weight
    return weighted_reduce(loss, weight, reduction, normalizer)


class _SigmoidCrossEntropy(torch.autograd.Function):
    """Element-wise ``max(x, 0) - x * t + log(1 + exp(-|x|))`` with the exact derivatives
    ``d/dx = sigmoid(x) - t`` and ``d/dt = -x``.

    The value is TensorFlow's ``sigmoid_cross_entropy_with_logits`` bit for bit (its ``where``
    selections are ``clamp`` and ``abs`` here: the same numbers). Autograd through that form
    would run four ``where`` passes backward, branchy on the CPU (about 10x an arithmetic
    pass on random signs), and ``clamp``/``abs`` alone would give ``1 - t`` at ``x = 0`` where
    TensorFlow's form gives ``sigmoid(0) - t``. The backward is built from differentiable
    operations, so second derivatives work.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor) -> Tensor:
        ctx.save_for_backward(x, t)
        return x.clamp(min=0).sub_(x * t).add_(torch.nn.functional.softplus(-x.abs()))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, t = ctx.saved_tensors
        grad_x = grad * (torch.sigmoid(x) - t) if ctx.needs_input_grad[0] else None
        grad_t = -grad * x if ctx.needs_input_grad[1] else None
        return grad_x, grad_t


def binary_cross_entropy_with_logits(
    logits: Tensor,
    targets: Tensor,
    *,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Sigmoid binary cross-entropy of ``logits (...)`` against (soft) ``targets (...)`` in [0, 1].

    ``max(x, 0) - x * t + log(1 + exp(-|x|))``: the same stable form and values as
    TensorFlow's ``sigmoid_cross_entropy_with_logits``, with gradient ``sigmoid(x) - t``
    (``0.5 - t`` at ``x = 0``, as TensorFlow's).

    >>> binary_cross_entropy_with_logits(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 0.0]), reduction="none")
    tensor([0.6931, 4.0181])
    """
    _check_pair(logits, targets)
    x, t = _acc(logits), _acc(targets)
    return weighted_reduce(_SigmoidCrossEntropy.apply(x, t), weight, reduction, normalizer)


def _modulating_factor(distance: Tensor, gamma: float) -> Tensor:
    """``distance ** gamma`` for ``distance >= 0``, with gradient 0 (not NaN) at ``distance == 0``.

    For ``0 < gamma < 1`` the derivative at 0 is infinite, and autograd would multiply it by
    the zero gradient of ``|.|`` at saturated logits (``sigmoid(x) == t`` in float32), giving
    NaN. The value is unchanged.
    """
    positive = distance > 0
    safe = torch.where(positive, distance, torch.ones_like(distance))
    return torch.where(positive, safe**gamma, torch.zeros_like(distance))


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    *,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017, arXiv:1708.02002) of ``logits (...)``.

    ``alpha_t * |t - p|**gamma * BCE(x, t)`` with ``p = sigmoid(x)`` and
    ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``. For 0/1 targets ``|t - p| = 1 - p_t``,
    the paper's form; soft targets are allowed. ``alpha < 0`` disables the alpha weighting
    (then ``alpha=-1, gamma=0`` is plain BCE). The modulating factor is not detached: its
    gradient flows, as in the paper and in YOLOv3's objectness focal term.

    >>> loss = sigmoid_focal_loss(torch.tensor([[3.0, -2.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> loss.shape, round(float(loss), 4)
    (torch.Size([]), 0.0343)
    """
    _check_pair(logits, targets)
    require_positive(gamma, "gamma", allow_zero=True)
    x, t = _acc(logits), _acc(targets)
    loss = binary_cross_entropy_with_logits(x, t, reduction="none")
    if gamma != 0:
        loss = loss * _modulating_factor((t - torch.sigmoid(x)).abs(), gamma)
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return weighted_reduce(loss, weight, reduction, normalizer)


def softmax_focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    *,
    alpha: Optional[Tensor] = None,
    ignore_index: int = -100,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Softmax focal loss ``-alpha[y] * (1 - p_y)**gamma * log p_y`` of ``logits (..., C)``.

    ``target (...)`` holds class indices; ``alpha`` is an optional per-class weight ``(C,)``;
    ``ignore_index`` entries contribute 0. ``gamma = 0`` and no ``alpha`` is cross-entropy.

    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    >>> softmax_focal_loss(logits, torch.tensor([0, 2]), reduction="none")
    tensor([0.0111, 0.4883])
    """
    require_floating(logits, "logits")
    require_integer(target, "target")
    require_positive(gamma, "gamma", allow_zero=True)
    if logits.dim() == 0:
        raise ValueError(f"logits: expected shape (..., C), got {tuple(logits.shape)}")
    if alpha is not None and (not isinstance(alpha, Tensor) or alpha.shape != logits.shape[-1:]):
        got = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ValueError(f"alpha: expected a tensor of shape (C={logits.shape[-1]},), got {got}")
    keep = target != ignore_index
    safe_target = torch.where(keep, target, 0).clamp(0, logits.shape[-1] - 1)
    ce = cross_entropy(logits, safe_target, reduction="none")
    loss = ce * _modulating_factor(-torch.expm1(-ce), gamma) if gamma != 0 else ce
    if alpha is not None:
        loss = loss * alpha.to(loss.dtype)[safe_target]
    require_weight_shape(weight, loss.shape)
    keep_weight = keep.to(loss.dtype)
    weight = keep_weight if weight is None else keep_weight * weight
    return weighted_reduce(loss, weight, reduction, normalizer)


def probability_cross_entropy(
    probs: Tensor,
    target: Tensor,
    *,
    eps: float = 1e-15,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Cross-entropy ``-sum_c target_c * log(max(probs_c, eps))`` of PROBABILITIES ``probs (..., C)``.

    For models whose head already ends in a softmax (ssd_keras's ``SSDLoss.log_loss``):
    ``target (..., C)`` is a one-hot or soft distribution of the same shape; the element-wise
    loss has shape ``(...)`` (the class dimension summed) and goes through
    :func:`weighted_reduce`. ``eps`` keeps ``log`` finite; below it the gradient w.r.t.
    ``probs`` is 0 (as TensorFlow's ``maximum``). Prefer :func:`cross_entropy` on logits
    where you have them: it is more accurate for tiny probabilities.

    >>> probability_cross_entropy(torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[1.0, 0.0, 0.0]]))
    tensor(0.3567)
    """
    _check_pair(probs, target, ("probs", "target"))
    require_positive(eps, "eps")
    p, t = _acc(probs), _acc(target)
    loss = -(t * torch.log(at_least(p, eps))).sum(dim=-1)
    return weighted_reduce(loss, weight, reduction, normalizer)


def objectness_loss(cls_logits: Tensor, labels: Tensor, normalizer: Optional[Tensor] = None) -> Tensor:
    """Mean objectness cross-entropy over the anchors with ``labels (B, A)`` >= 0.

    ``cls_logits`` is ``(B, A, 2)`` ``[background, object]`` (softmax) or ``(B, A)`` (sigmoid).
    With ``normalizer`` the sum is divided by it instead (the all-reduced sample count).
    ``labels`` are targets the library built (1 object, 0 background, -1 ignored); like every
    term of :mod:`detloss.functional`, their values are not read on the host.
    """
    reduction = "mean" if normalizer is None else "sum"
    if cls_logits.shape == labels.shape:
        keep = (labels >= 0).to(compute_dtype(cls_logits))
        return binary_cross_entropy_with_logits(
            cls_logits, labels.clamp(min=0).to(keep.dtype), weight=keep, reduction=reduction, normalizer=normalizer
        )
    return cross_entropy(cls_logits, labels, ignore_index=-1, reduction=reduction, normalizer=normalizer)
