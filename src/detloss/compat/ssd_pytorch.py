"""Drop-in for ssd.pytorch's ``layers.modules.MultiBoxLoss`` (amdegroot/ssd.pytorch).

Same constructor and call, same numbers (see ``golden/torch/README.md``), batched and
without the per-image Python loop. Built on :class:`detloss.SSDLoss`, with the original's
behaviour selected through its options:

* zero-area GTs are matched as in the original (``drop_degenerate_gt=False``): forced onto
  their best prior (prior 0, IoU 0). Their targets are large but finite, not ``-inf``.
* The original's ``loss_c[pos] = 0`` line fails on PyTorch >= 0.4 for batches > 1 (boolean
  mask (B, P) against a (B*P, 1) tensor); this computes what was intended.
* Images without GT (``(0, 5)``, ``(0, 4)`` or ``(0,)`` targets) are accepted (the original
  crashes) and contribute only through the batch normaliser; ``N`` is clamped at 1.
* ``use_gpu`` is accepted and ignored: everything follows the device of the predictions.
* ``prior_for_matching``, ``bkg_label``, ``neg_mining``, ``neg_overlap`` and
  ``encode_target`` are stored and, as in the original, unused.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .._validate import joined_value_checks, require_tensor
from ..detectors.ssd import SSDLoss
from ..targets import pad_ground_truth

__all__ = ["MultiBoxLoss"]

VARIANCES = (0.1, 0.2)


def split_targets(targets: Sequence[Tensor], width: int, like: Tensor) -> list[Tensor]:
    """One ``(n_i, width)`` target tensor per image of ``like (B, ...)``, on its device/dtype.

    ``targets`` is a list of ``B`` tensors (or a ``(B, n, width)`` tensor); empty ones become
    ``(0, width)``. Raises ``ValueError`` naming the offending entry, or the count.
    """
    if isinstance(targets, Tensor) and targets.dim() == 3:
        targets = list(targets.unbind(0))
    rows = []
    for i, t in enumerate(targets):
        require_tensor(t, f"targets[{i}]")
        if t.numel() == 0:
            t = t.reshape(0, width)
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"targets[{i}]: expected shape (n, {width}), got {tuple(t.shape)}")
        rows.append(t.detach().to(device=like.device, dtype=like.dtype))
    if len(rows) != like.shape[0]:
        raise ValueError(f"targets: expected one tensor per image ({like.shape[0]}), got {len(rows)}")
    return rows


class MultiBoxDropIn(nn.Module):
    """The constructor both ``MultiBoxLoss`` originals share (ssd.pytorch, Pytorch_Retinaface).

    Stores the original's attributes under the original's names (``threshold``,
    ``negpos_ratio``, ``variance``, ...); the flags that the originals store but never read
    (``prior_for_matching``, ``bkg_label``, ``neg_mining``, ``neg_overlap``,
    ``encode_target``) are unused here too. Subclasses build the native loss, ``self.loss``,
    in :meth:`native_loss` from these attributes.
    """

    def __init__(
        self,
        num_classes: int,
        overlap_thresh: float,
        prior_for_matching: bool,
        bkg_label: int,
        neg_mining: bool,
        neg_pos: int,
        neg_overlap: float,
        encode_target: bool,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.threshold = overlap_thresh
        self.background_label = bkg_label
        self.encode_target = encode_target
        self.use_prior_for_matching = prior_for_matching
        self.do_neg_mining = neg_mining
        self.negpos_ratio = neg_pos
        self.neg_overlap = neg_overlap
        self.variance = list(VARIANCES)
        self.loss = self.native_loss()

    def native_loss(self) -> nn.Module:
        raise NotImplementedError


class MultiBoxLoss(MultiBoxDropIn):
    """ssd.pytorch ``MultiBoxLoss(num_classes, overlap_thresh, prior_for_matching, bkg_label,
    neg_mining, neg_pos, neg_overlap, encode_target, use_gpu=True)``.

    ``forward((loc_data (B, P, 4), conf_data (B, P, C), priors (P, 4) cxcywh), targets)`` with
    ``targets`` a list of ``B`` float tensors ``(n_i, 5)`` ``[xmin, ymin, xmax, ymax, label]``
    (normalised corners, labels 0-based without background) returns ``(loss_l, loss_c)``,
    both divided by the batch's positive count.
    """

    def __init__(
        self,
        num_classes: int,
        overlap_thresh: float,
        prior_for_matching: bool,
        bkg_label: int,
        neg_mining: bool,
        neg_pos: int,
        neg_overlap: float,
        encode_target: bool,
        use_gpu: bool = True,
    ) -> None:
        super().__init__(
            num_classes, overlap_thresh, prior_for_matching, bkg_label, neg_mining, neg_pos, neg_overlap, encode_target
        )
        self.use_gpu = use_gpu

    def native_loss(self) -> SSDLoss:
        return SSDLoss(
            self.num_classes, variances=VARIANCES, pos_iou=self.threshold,
            neg_pos_ratio=self.negpos_ratio, drop_degenerate_gt=False,
        )

    def forward(self, predictions, targets):
        loc_data, conf_data, priors = predictions
        require_tensor(loc_data, "loc_data")
        rows = split_targets(targets, 5, loc_data)
        with joined_value_checks() as checks:  # read with the loss's own checks: one host read
            gt_boxes, gt_labels, gt_valid = pad_ground_truth(
                [t[:, :4] for t in rows], [t[:, 4].long() for t in rows], checks=checks
            )
            out = self.loss(loc_data, conf_data, priors, gt_boxes, gt_labels, gt_valid)
        return out["loss_box"], out["loss_cls"]
