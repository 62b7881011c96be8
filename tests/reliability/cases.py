"""One small input builder per native composite loss, for the reliability tests.

``make_case(family, ...)`` returns a :class:`Case`: the loss module, its positional
arguments, which of them are predictions (the tensors a network would output, leaves that
require grad) and which are batched (sliced by :meth:`Case.slice` for the distributed
tests). Knobs: batch size, GT count per image (0 allowed), degenerate GT boxes, extreme
logits, prediction dtype, seed. Everything is tiny (a few dozen priors / anchors) so a
forward + backward takes milliseconds.

Families and their conventions (see each module's docstring):

* ``ssd``: priors normalised cxcywh, GT normalised xyxy, labels ``[0, C-2]`` (column k+1).
* ``retinaface``: as SSD, 2 columns (background, face), 5-point landmarks.
* ``yolov3``: three NHWC heads of a 64x64 input, GT xyxy pixels, labels ``[0, C-1]``.
* ``retinanet``: anchors xyxy pixels, labels ``[0, K-1]`` (sigmoid column k, no background).
* ``rpn``: anchors xyxy pixels, objectness logits ``(B, A, 2)``.
* ``rcnn``: ROI head on :func:`detloss.proposal_targets` (labels ``[1, C-1]``, 0 background).
* ``faster_rcnn``: RPN + R-CNN.
* ``yolov8``: anchor points of three levels of a 64x64 input (84 anchors), box distributions
  ``(B, A, 4 * YOLOV8_REG_MAX)``, GT xyxy pixels, labels ``[0, C-1]`` (sigmoid column k).
* ``detr``: ``DETR_LAYERS`` decoder layers x ``DETR_QUERIES`` queries, predictions
  ``(L, B, Q, ...)`` (batch dimension 1), GT normalised cxcywh, labels ``[0, C-1]``.
* ``rt_detr``, ``d_fine`` (:data:`RT_DETR_FAMILIES`): :class:`detloss.RTDETRLoss` with the
  encoder output and denoising groups (``d_fine``: MAL, dense one-to-one, FGL / DDF); its
  keyword inputs are positional here (``_KeywordLoss``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

import detloss
from detloss.matching.rcnn_targets import ProposalTargets, proposal_targets
from detloss.priors import anchor_points

FAMILIES = ("ssd", "retinaface", "yolov3", "retinanet", "rpn", "rcnn", "faster_rcnn", "detr", "yolov8")
# Families whose positional arguments are normalised boxes.
NORMALISED = ("ssd", "retinaface", "detr")
IMAGE = 64  # pixel side of the synthetic images
NUM_CLASSES = {"rt_detr": 3, "d_fine": 3, "ssd": 4, "retinaface": 2, "yolov3": 3, "retinanet": 3, "rpn": 2, "rcnn": 4, "faster_rcnn": 4, "detr": 3, "yolov8": 3,
               "yolo_obb": 3, "yolo26": 3, "yolo26_obb": 3}
YOLOV8_REG_MAX = 8
YOLO_STRIDES = (8, 16, 32)
RCNN_SAMPLES = 8
RCNN_PROPOSALS = 12
DETR_LAYERS = 3
DETR_QUERIES = 6
#: real-time DETR families (not in FAMILIES: their reliability tests are in test_rt_detr_reliability.py)
RT_DETR_FAMILIES = ("rt_detr", "d_fine")
#: oriented-box YOLO and YOLO26 families (not in FAMILIES: test_yolo_tasks_reliability.py)
YOLO_TASK_FAMILIES = ("yolo_obb", "yolo26", "yolo26_obb")
RT_DETR_BINS = 8


def small_priors() -> Tensor:
    """48 normalised cxcywh priors: a 4x4 grid, sizes 0.2 and 0.45, plus a 2:1 box."""
    centres = (torch.arange(4, dtype=torch.float32) + 0.5) / 4
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)
    shapes = torch.tensor([[0.2, 0.2], [0.45, 0.45], [0.4, 0.2]])
    rows = [torch.cat((cx, cy, wh.expand(cx.shape[0], 2)), dim=1) for wh in shapes]
    return torch.stack(rows, dim=1).reshape(-1, 4)


def small_anchors() -> Tensor:
    """128 xyxy pixel anchors: an 8x8 grid (stride 8) with sizes 16 and 32."""
    centres = torch.arange(8, dtype=torch.float32) * 8 + 4
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    ctr = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
    half = torch.tensor([[-8.0, -8, 8, 8], [-16, -16, 16, 16]])
    return (ctr + half).reshape(-1, 4)


def random_gt(
    gen: torch.Generator,
    counts: Sequence[int],
    scale: float,
    *,
    degenerate: bool = False,
    min_size: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Padded xyxy GT boxes ``(B, M, 4)`` in ``[0, scale]`` and validity ``(B, M)``.

    With ``degenerate``, in each image box 0 has zero width, box 1 negative width and box 2
    zero height (the dirty labels / crop-augmentation leftovers of failure mode 3).
    """
    b, m = len(counts), max(counts, default=0)
    ctr = torch.rand(b, m, 2, generator=gen) * 0.8 + 0.1
    size = torch.rand(b, m, 2, generator=gen) * 0.5 + min_size
    boxes = torch.cat((ctr - size / 2, ctr + size / 2), dim=-1).clamp(0, 1)
    if degenerate and m:
        boxes[:, 0, 2] = boxes[:, 0, 0]
        if m > 1:
            boxes[:, 1, [0, 2]] = boxes[:, 1, [2, 0]]
        if m > 2:
            boxes[:, 2, 3] = boxes[:, 2, 1]
    valid = torch.arange(m).unsqueeze(0) < torch.tensor(list(counts)).unsqueeze(1)
    boxes = torch.where(valid.unsqueeze(-1), boxes, torch.zeros(()))
    return boxes * scale, valid


@dataclass
class Case:
    """A loss module with a full set of positional arguments.

    ``preds``: indices of prediction arguments (a tensor, or a list of tensors for YOLO
    heads); ``batched``: per argument, whether its first dimension is the batch (lists and
    :class:`ProposalTargets` are sliced item by item); ``generator_seed``: the R-CNN sampling
    gets a fresh ``torch.Generator`` seeded with it at every call.
    """

    family: str
    module: nn.Module
    args: list
    batched: list
    preds: list
    batch: int
    generator_seed: Optional[int] = None
    kwargs: dict = field(default_factory=dict)
    batch_dims: Optional[list] = None  # per argument, the batch dimension (default 0)

    def pred_tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        for i in self.preds:
            a = self.args[i]
            out.extend(a if isinstance(a, (list, tuple)) else [a])
        return out

    def pred_batch_dims(self) -> list[int]:
        """The batch dimension of each tensor of :meth:`pred_tensors`."""
        out: list[int] = []
        for i in self.preds:
            a, d = self.args[i], (self.batch_dims or [0] * len(self.args))[i]
            out.extend([d] * len(a) if isinstance(a, (list, tuple)) else [d])
        return out

    def map_preds(self, fn: Callable[[Tensor], Tensor]) -> "Case":
        """A copy whose prediction tensors are ``fn(t)`` (e.g. a dtype cast)."""
        args = list(self.args)
        for i in self.preds:
            a = args[i]
            args[i] = [fn(t) for t in a] if isinstance(a, (list, tuple)) else fn(a)
        return dataclasses.replace(self, args=args)

    def leaves(self, dtype: Optional[torch.dtype] = None) -> "Case":
        """A copy whose predictions are fresh leaves (optionally cast) that require grad."""
        return self.map_preds(lambda t: t.detach().to(dtype or t.dtype).clone().requires_grad_(True))

    def call(self, module: Optional[Callable] = None, **extra: Any) -> dict:
        kwargs = dict(self.kwargs, **extra)
        if self.generator_seed is not None:
            kwargs["generator"] = torch.Generator().manual_seed(self.generator_seed)
        return (self.module if module is None else module)(*self.args, **kwargs)

    def slice(self, start: int, stop: int) -> "Case":
        """The images ``start:stop`` of the batch (shared priors / anchors unchanged)."""
        def cut(a: Any, dim: int = 0) -> Any:
            if isinstance(a, Tensor):
                return a.narrow(dim, start, stop - start)
            if isinstance(a, (list, tuple)):
                return [cut(t) for t in a]
            if isinstance(a, ProposalTargets):
                return ProposalTargets(**{f.name: cut(getattr(a, f.name)) for f in dataclasses.fields(a)})
            raise TypeError(type(a))

        dims = self.batch_dims or [0] * len(self.args)
        args = [cut(a, d) if b else a for a, b, d in zip(self.args, self.batched, dims)]
        return dataclasses.replace(self, args=args, batch=stop - start)


def _counts(batch: int, num_gt: Union[int, Sequence[int]]) -> list[int]:
    return [num_gt] * batch if isinstance(num_gt, int) else list(num_gt)


def make_case(
    family: str,
    *,
    batch: int = 2,
    num_gt: Union[int, Sequence[int]] = 3,
    degenerate: bool = False,
    logit_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    sample_all: bool = False,
    options: Optional[dict] = None,
) -> Case:
    """Build the :class:`Case` of ``family`` (one of :data:`FAMILIES`).

    ``num_gt``: GT boxes per image (an int, or one count per image); ``logit_scale``
    multiplies every prediction (1e4 for extreme logits); ``dtype``: prediction dtype (GT,
    priors and anchors stay float32); ``sample_all``: R-CNN samplers keep every candidate
    (no random subsampling, so a split batch sees the same samples); ``options``: extra
    constructor arguments of the loss module.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = _counts(batch, num_gt)
    options = dict(options or {})
    c = NUM_CLASSES[family]

    def pred(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=gen) * logit_scale).to(dtype).requires_grad_(True)

    def labels(low: int, high: int) -> Tensor:
        m = max(counts, default=0)
        return torch.randint(low, high + 1, (batch, m), generator=gen)

    if family in RT_DETR_FAMILIES:
        return _rt_detr_case(family, gen, counts, c, options, pred, labels, degenerate, dtype)

    if family in YOLO_TASK_FAMILIES:
        return _yolo_task_case(family, gen, counts, c, options, pred, labels, degenerate, batch)

    if family == "detr":
        boxes, valid = random_gt(gen, counts, 1.0, degenerate=degenerate)
        gt = torch.where(valid.unsqueeze(-1), detloss.xyxy_to_cxcywh(boxes), torch.zeros(()))
        shape = (DETR_LAYERS, batch, DETR_QUERIES)
        centres = torch.rand(*shape, 2, generator=gen) * 0.8 + 0.1  # sigmoid outputs of a head
        sizes = torch.rand(*shape, 2, generator=gen) * 0.4 + 0.05
        pred_boxes = torch.cat((centres, sizes), -1).to(dtype).requires_grad_(True)
        module = detloss.DETRLoss(c, **options)
        args = [pred_boxes, pred(*shape, c + 1), gt, labels(0, c - 1), valid]
        return Case(family, module, args, [True] * 5, [0, 1], batch, batch_dims=[1, 1, 0, 0, 0])

    if family == "yolov8":

        points, strides = anchor_points([(IMAGE // s, IMAGE // s) for s in YOLO_STRIDES], YOLO_STRIDES)
        a = points.shape[0]
        boxes, valid = random_gt(gen, counts, float(IMAGE), degenerate=degenerate, min_size=0.2)
        reg_max = options.setdefault("reg_max", YOLOV8_REG_MAX)
        module = detloss.YOLOv8Loss(c, **options)
        args = [pred(batch, a, 4 * reg_max), pred(batch, a, c), points, strides, boxes, labels(0, c - 1), valid]
        kwargs = {"image_size": (IMAGE, IMAGE)} if reg_max == 1 else {}
        return Case(family, module, args, [True, True, False, False, True, True, True], [0, 1], batch, kwargs=kwargs)

    if family in ("ssd", "retinaface"):
        priors = small_priors()
        p = priors.shape[0]
        boxes, valid = random_gt(gen, counts, 1.0, degenerate=degenerate)
        if family == "ssd":
            module = detloss.SSDLoss(c, **options)
            args = [pred(batch, p, 4), pred(batch, p, c), priors, boxes, labels(0, c - 2), valid]
            return Case(family, module, args, [True, True, False, True, True, True], [0, 1], batch)
        m = boxes.shape[1]
        landmarks = (torch.rand(batch, m, 10, generator=gen) * 0.8 + 0.1) * valid.unsqueeze(-1)
        has = valid & (torch.rand(batch, m, generator=gen) > 0.3)
        module = detloss.RetinaFaceLoss(**options)
        args = [pred(batch, p, 4), pred(batch, p, c), pred(batch, p, 10), priors, boxes, landmarks, has, valid]
        return Case(family, module, args, [True, True, True, False, True, True, True, True], [0, 1, 2], batch)

    if family == "yolov3":
        boxes, valid = random_gt(gen, counts, float(IMAGE), degenerate=degenerate)
        module = detloss.YOLOv3Loss(c, strides=YOLO_STRIDES, **options)
        channels = 3 * (5 + c)
        heads = [pred(batch, IMAGE // s, IMAGE // s, channels) for s in YOLO_STRIDES]
        args = [heads, boxes, labels(0, c - 1), valid]
        return Case(family, module, args, [True, True, True, True], [0], batch)

    anchors = small_anchors()
    a = anchors.shape[0]
    boxes, valid = random_gt(gen, counts, float(IMAGE), degenerate=degenerate, min_size=0.2)
    if family == "retinanet":
        module = detloss.RetinaNetLoss(c, **options)
        cls_logits, box_pred = pred(batch, a, c), pred(batch, a, 4)
        args = [box_pred, cls_logits, anchors, boxes, labels(0, c - 1), valid]
        return Case(family, module, args, [True, True, False, True, True, True], [0, 1], batch)

    rpn_options = dict(batch_size_per_image=a, positive_fraction=1.0) if sample_all else dict(batch_size_per_image=32)
    if family == "rpn":
        module = detloss.RPNLoss(**rpn_options, **options)
        cls_logits, box_pred = pred(batch, a, 2), pred(batch, a, 4)
        args = [box_pred, cls_logits, anchors, boxes, valid, (IMAGE, IMAGE)]
        return Case(family, module, args, [True, True, False, True, True, False], [0, 1], batch, generator_seed=seed)

    gt_labels = labels(1, c - 1)
    jitter = torch.randn(batch, RCNN_PROPOSALS, 4, generator=gen) * 4
    base = boxes.repeat(1, (RCNN_PROPOSALS // max(boxes.shape[1], 1)) + 1, 1)[:, :RCNN_PROPOSALS]
    if base.shape[1] < RCNN_PROPOSALS:
        base = torch.zeros(batch, RCNN_PROPOSALS, 4) + torch.tensor([16.0, 16, 48, 48])
    proposals = (base + jitter).clamp(0, IMAGE)
    targets = proposal_targets(
        proposals, boxes, gt_labels, valid, num_samples=RCNN_SAMPLES, num_classes=c,
        fg_fraction=1.0 if sample_all else 0.25, generator=torch.Generator().manual_seed(seed),
    )
    cls_logits, box_pred = pred(batch, RCNN_SAMPLES, c), pred(batch, RCNN_SAMPLES, 4 * c)
    head = [box_pred, cls_logits]
    if family == "rcnn":
        module = detloss.RCNNLoss(**options)
        return Case(family, module, [*head, targets], [True, True, True], [0, 1], batch)
    module = detloss.FasterRCNNLoss(**rpn_options, **options)
    rpn_cls_logits, rpn_box_pred = pred(batch, a, 2), pred(batch, a, 4)
    args = [rpn_box_pred, rpn_cls_logits, anchors, boxes, valid, (IMAGE, IMAGE), *head, targets]
    batched = [True, True, False, True, True, False, True, True, True]
    return Case(family, module, args, batched, [0, 1, 6, 7], batch, generator_seed=seed)


class _KeywordLoss(nn.Module):
    """A loss whose keyword-only inputs are taken positionally (the reliability tests slice, cast and
    differentiate positional arguments): ``forward(*args)`` -> ``loss(*args[:n], **dict(zip(names, rest)))``."""

    def __init__(self, loss: nn.Module, positional: int, names: Sequence[str]) -> None:
        super().__init__()
        self.loss, self.positional, self.names = loss, positional, list(names)

    def forward(self, *args: Any, **kwargs: Any) -> dict:
        return self.loss(*args[: self.positional], **dict(zip(self.names, args[self.positional:])), **kwargs)


def _rt_detr_case(family, gen, counts, c, options, pred, labels, degenerate, dtype) -> Case:
    """``rt_detr``: decoder layers, encoder output and denoising groups (VFL); ``d_fine``: MAL with
    DEIM's dense one-to-one, FGL and DDF (``RT_DETR_BINS`` bins) on every layer."""
    batch = len(counts)
    boxes, valid = random_gt(gen, counts, 1.0, degenerate=degenerate)
    gt = torch.where(valid.unsqueeze(-1), detloss.xyxy_to_cxcywh(boxes), torch.zeros(()))
    m, layers, q, dn_groups = max(counts, default=0), DETR_LAYERS, DETR_QUERIES, 2
    d = dn_groups * 2 * max(m, 1)  # positive and negative query per object and group

    def boxes_pred(*shape: int) -> Tensor:
        centres = torch.rand(*shape, 2, generator=gen) * 0.8 + 0.1
        sizes = torch.rand(*shape, 2, generator=gen) * 0.4 + 0.05
        return torch.cat((centres, sizes), -1).to(dtype).requires_grad_(True)

    q2g = torch.full((batch, d), -1, dtype=torch.int64)
    for b, n in enumerate(counts):
        for g in range(dn_groups):
            q2g[b, g * 2 * max(m, 1): g * 2 * max(m, 1) + n] = torch.arange(n)
    if family == "d_fine":
        options = {"class_loss": "mal", "dense_one_to_one": True, "max_num_bins": RT_DETR_BINS, **options}
    module = detloss.RTDETRLoss(c, **options)
    args = [boxes_pred(layers, batch, q), pred(layers, batch, q, c), gt, labels(0, c - 1), valid,
            boxes_pred(batch, q), pred(batch, q, c), boxes_pred(layers, batch, d), pred(layers, batch, d, c), q2g, dn_groups]
    names = ["enc_box_pred", "enc_cls_logits", "dn_box_pred", "dn_cls_logits", "dn_query_to_gt", "dn_groups"]
    preds, dims = [0, 1, 5, 6, 7, 8], [1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    batched = [True] * 10 + [False]
    if family == "d_fine":
        r = 4 * (RT_DETR_BINS + 1)
        refs = lambda *shape: boxes_pred(*shape).detach()  # noqa: E731  (the decoder's reference boxes)
        args += [pred(layers, batch, q, r), refs(layers, batch, q), pred(layers, batch, d, r), refs(layers, batch, d)]
        names += ["pred_corners", "ref_points", "dn_pred_corners", "dn_ref_points"]
        preds += [11, 13]
        dims += [1, 1, 1, 1]
        batched += [True] * 4
    return Case(family, _KeywordLoss(module, 5, names), args, batched, preds, batch, batch_dims=dims)


def _yolo_task_case(family, gen, counts, c, options, pred, labels, degenerate, batch) -> Case:
    """``yolo_obb``: :class:`detloss.YOLOOBBLoss` (reg_max 8), GT ``(B, M, 5)`` xywhr pixels (with
    ``degenerate``: a point, a zero-width box and a square); ``yolo26`` / ``yolo26_obb``:
    :class:`detloss.YOLO26Loss` (reg_max 1, epoch 3 of 10), each prediction a (one2many, one2one) pair."""
    points, strides = anchor_points([(IMAGE // s, IMAGE // s) for s in YOLO_STRIDES], YOLO_STRIDES)
    a, m = points.shape[0], max(counts, default=0)
    oriented = family != "yolo26"
    if oriented:
        centre = torch.rand(batch, m, 2, generator=gen) * 40 + 12
        size = torch.rand(batch, m, 2, generator=gen) * 24 + 4
        angle = torch.rand(batch, m, 1, generator=gen) * 3.4 - 1.7
        if degenerate and m:
            size[:, 0] = 0.0
            if m > 1:
                size[:, 1, 0] = 0.0
            if m > 2:
                size[:, 2, 1] = size[:, 2, 0]
        valid = torch.arange(m).unsqueeze(0) < torch.tensor(list(counts)).unsqueeze(1)
        boxes = torch.where(valid.unsqueeze(-1), torch.cat((centre, size, angle), -1), torch.zeros(()))
        if degenerate:
            options.setdefault("min_object_size", 0.0)
    else:
        boxes, valid = random_gt(gen, counts, float(IMAGE), degenerate=degenerate, min_size=0.2)
    gt = [points, strides, boxes, labels(0, c - 1), valid]
    if family == "yolo_obb":
        reg_max = options.setdefault("reg_max", YOLOV8_REG_MAX)
        module = detloss.YOLOOBBLoss(c, **options)
        args = [pred(batch, a, 4 * reg_max), pred(batch, a, c), pred(batch, a, 1), *gt]
        return Case(family, module, args, [True, True, True, False, False, True, True, True], [0, 1, 2], batch)
    module = detloss.YOLO26Loss(c, epochs=10, oriented=oriented, **options)
    heads = [[pred(batch, a, 4), pred(batch, a, 4)], [pred(batch, a, c), pred(batch, a, c)]]
    if oriented:
        heads.append([pred(batch, a, 1), pred(batch, a, 1)])
    n = len(heads)
    return Case(family, module, [*heads, *gt], [True] * n + [False, False, True, True, True], list(range(n)), batch,
                kwargs={"epoch": 3, "image_size": (IMAGE, IMAGE)})


def loss_and_grads(case: Case, **extra: Any) -> tuple[dict, list[Tensor]]:
    """Forward, then backward of ``out["loss"]``; returns the outputs and the gradients of the
    predictions (zeros where a prediction gets no gradient)."""
    out = case.call(**extra)
    preds = case.pred_tensors()
    grads = torch.autograd.grad(out["loss"], preds, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(preds, grads)]
    return out, grads


def scalar_items(out: dict) -> dict[str, Tensor]:
    """The tensor components of a loss output (the assignment left out)."""
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}
