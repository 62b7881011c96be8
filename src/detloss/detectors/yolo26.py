"""YOLO26's end-to-end (NMS-free) loss: a one-to-many and a one-to-one task-aligned branch on the
same ground truth, weighted by an explicit schedule of the epoch.

1. **One-to-many** branch: the YOLOv8 loss (:class:`detloss.YOLOv8Loss`, or
   :class:`detloss.YOLOOBBLoss` for oriented heads) with top-k 10: many anchors per object,
   rich gradients early in training.
2. **One-to-one** branch: the same loss on the second head's outputs with top-k 7 then top-k2 1:
   each object keeps its single best anchor, so the head learns to fire once per object and
   needs no NMS at inference.
3. **Schedule** (:func:`yolo26_branch_weights`): the one-to-many weight falls linearly from 0.8
   at epoch 0 to 0.1 at epoch ``epochs - 1`` (and stays there); the one-to-one weight is
   ``1 - o2m``. It is a plain function of the epoch the caller passes: no hidden state.
4. ``loss = o2m * loss_one2many + o2o * loss_one2one``, term by term.

Both branches see the same ground truth, checked once (one host read per forward).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._validate import ValueChecks, require_positive
from .yolo_obb import YOLOOBBLoss
from .yolov8 import YOLOv8Loss

__all__ = ["YOLO26Loss", "yolo26_branch_weights"]

Pair = Union[Sequence[Tensor], Tensor]


def yolo26_branch_weights(
    epoch: float, epochs: int, *, start: float = 0.8, end: float = 0.1
) -> tuple[float, float]:
    """``(o2m, o2o)`` branch weights of YOLO26's loss at ``epoch`` (0-based; fractions allowed)
    of ``epochs``: ``o2m = max(1 - epoch / max(epochs - 1, 1), 0) * (start - end) + end``, linear
    from ``start`` at epoch 0 to ``end`` at epoch ``epochs - 1`` and constant after, and
    ``o2o = max(1 - o2m, 0)``. (ultralytics 8.4's ``E2ELoss.decay`` after ``epoch`` updates.)

    >>> yolo26_branch_weights(0, 10)
    (0.8, 0.19999999999999996)
    >>> [round(w, 4) for w in yolo26_branch_weights(4, 10)], yolo26_branch_weights(9, 10)[0]
    ([0.4889, 0.5111], 0.1)
    """
    require_positive(epoch, "epoch", allow_zero=True)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    o2m = max(1 - epoch / max(epochs - 1, 1), 0) * (start - end) + end
    return o2m, max(1.0 - o2m, 0)


def _branches(x: Pair, name: str) -> tuple[Tensor, Tensor]:
    if isinstance(x, Tensor):
        if x.dim() < 1 or x.shape[0] != 2:
            raise ValueError(f"{name}: expected a (one2many, one2one) pair or a tensor of shape (2, ...), "
                             f"got {tuple(x.shape)}")
        return x[0], x[1]
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        raise ValueError(f"{name}: expected a (one2many, one2one) pair of tensors, got {type(x).__name__}")
    return x[0], x[1]


class YOLO26Loss(nn.Module):
    """YOLO26's two-branch loss (see the module doc).

    Args:
        num_classes: ``C``.
        epochs: the length of training, for the schedule.
        oriented: oriented-box heads (:class:`detloss.YOLOOBBLoss` branches) instead of axis-aligned.
        reg_max: bins per side (YOLO26: 1, plain distances with the L1 term; needs ``image_size``).
        one2many_topk: 10; one2one_topk, one2one_topk2: 7 and 1.
        **options: any other option of the branch loss (gains, alpha, beta, ...).

    ``forward(box_pred, cls_logits, [angle_pred,] anchor_points, anchor_strides, gt_boxes,
    gt_labels, gt_valid, *, epoch, image_size=None, return_assignment=False)``: each prediction
    argument is a ``(one2many, one2one)`` pair of the branch loss's tensors (``(B, A, 4 *
    reg_max)``, ``(B, A, C)``, ``(B, A)`` radians) or one tensor with a leading dimension of 2;
    ``gt_boxes (B, M, 4)`` xyxy pixels (oriented: ``(B, M, 5)`` xywhr). Returns the branch terms
    weighted and summed (``"loss_box"``, ``"loss_cls"``, ``"loss_dfl"``, [``"loss_angle"``],
    ``"loss"``), the one-to-one branch's own ``"loss"`` as ``"one2one_loss"`` and the weights as
    ``"o2m_weight"`` / ``"o2o_weight"`` (Python floats: no tensor is built from them); with
    ``return_assignment`` the two assignments as ``"assignment"`` (one-to-many) and ``"one2one_assignment"``.

    >>> loss_fn = YOLO26Loss(2, epochs=10, reg_max=4)
    >>> points = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    >>> out = loss_fn(torch.zeros(2, 1, 4, 16), torch.zeros(2, 1, 4, 2), points, torch.full((4,), 8.0),
    ...               torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]), torch.tensor([[1]]), torch.tensor([[True]]), epoch=0)
    >>> round(out["o2m_weight"], 3), bool(out["loss"] > 0)
    (0.8, True)
    """

    def __init__(
        self, num_classes: int, *, epochs: int, oriented: bool = False, reg_max: int = 1,
        one2many_topk: int = 10, one2one_topk: int = 7, one2one_topk2: Optional[int] = 1, **options,
    ) -> None:
        super().__init__()
        yolo26_branch_weights(0, epochs)  # checks epochs
        self.epochs, self.oriented = epochs, bool(oriented)
        cls = YOLOOBBLoss if oriented else YOLOv8Loss
        self.one2many = cls(num_classes, reg_max=reg_max, topk=one2many_topk, topk2=None, **options)
        self.one2one = cls(num_classes, reg_max=reg_max, topk=one2one_topk, topk2=one2one_topk2, **options)

    def forward(self, *args, epoch: float, image_size: Optional[Sequence[int]] = None,
                return_assignment: bool = False) -> dict:
        n_pred = 3 if self.oriented else 2
        if len(args) != n_pred + 5:
            raise TypeError(f"YOLO26Loss.forward: expected {n_pred + 5} positional arguments, got {len(args)}")
        names = ("box_pred", "cls_logits", "angle_pred")[:n_pred]
        pairs = [_branches(x, name) for x, name in zip(args[:n_pred], names)]
        shared = args[n_pred:]
        o2m_w, o2o_w = yolo26_branch_weights(epoch, self.epochs)
        many = [p[0] for p in pairs]
        one = [p[1] for p in pairs]
        # one check of the ground truth for both branches (one host read); metadata of both heads
        checks = ValueChecks()
        gt_valid, image_size = self.one2many.check_inputs(checks, *many, *shared, image_size)
        self.one2one.check_inputs(ValueChecks(), *one, *shared, image_size)
        checks.run()
        shared = (*shared[:-1], gt_valid)
        a = self.one2many.forward_unchecked(*many, *shared, image_size=image_size, return_assignment=return_assignment)
        b = self.one2one.forward_unchecked(*one, *shared, image_size=image_size, return_assignment=return_assignment)
        out = {k: a[k] * o2m_w + b[k] * o2o_w for k in a if k.startswith("loss")}
        out["one2one_loss"] = b["loss"]
        out["o2m_weight"], out["o2o_weight"] = o2m_w, o2o_w
        if return_assignment:
            out["assignment"], out["one2one_assignment"] = a["assignment"], b["assignment"]
        return out

