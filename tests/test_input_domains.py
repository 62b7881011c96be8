"""Every input an original accepts (and turns into finite numbers) passes through the native loss
and the drop-in: the project's own prior / anchor generators at training sizes 128 to 1024 px,
ground truth that sticks out of the image after augmentation, faces without landmarks (-1).

Found with Pytorch_Retinaface at 320 px: its 512 px priors are 1.6 image widths wide and were
taken for pixel boxes. What tells pixels from normalised coordinates is where the centres are.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import detloss
from detloss.compat import retinaface as compat_retinaface
from detloss.compat import ssd_pytorch, tensorflow_yolov3, tf_faster_rcnn
from detloss.priors import rcnn_anchors, retinaface_priors, retinanet_anchors, ssd_priors, yolov3_anchors
from oracles import ssd as oracle

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

SIZES = (128, 320, 640, 840, 1024)  # 640: cfg_mnet's training size, 840: cfg_re50's


def finite_grads(total: torch.Tensor, preds: list[torch.Tensor]) -> None:
    assert torch.isfinite(total), total
    for g in torch.autograd.grad(total, preds):
        assert torch.isfinite(g).all()


def face_targets(gen: torch.Generator, n: int, *, outside: bool = False) -> torch.Tensor:
    """``(n, 15)`` Pytorch_Retinaface rows: normalised corners, 10 landmark coords, label 1 / -1
    (-1: no landmarks, which the original stores as landmark coordinates of -1)."""
    xy = torch.rand(n, 2, generator=gen) * 0.6 + 0.1
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    boxes = torch.cat((xy, xy + wh), 1)
    if outside and n:
        boxes[0] = torch.tensor([-0.2, 0.3, 0.25, 0.6])  # a face cut by the crop, not clipped
    landmarks = torch.rand(n, 10, generator=gen) * 0.8 + 0.1
    label = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0)
    landmarks[label < 0] = -1.0
    return torch.cat((boxes, landmarks, label[:, None]), 1)


def face_preds(gen: torch.Generator, batch: int, priors: torch.Tensor) -> list[torch.Tensor]:
    p = priors.shape[0]
    return [torch.randn(batch, p, k, generator=gen).requires_grad_() for k in (4, 2, 10)]


@pytest.mark.parametrize("size", SIZES)
def test_retinaface_priors_at_every_training_size(size):
    priors = retinaface_priors(size)  # min sizes 16..512 px, steps 8/16/32 (cfg_mnet and cfg_re50 alike)
    gen = torch.Generator().manual_seed(size)
    targets = [face_targets(gen, 4, outside=True), face_targets(gen, 0)]
    preds = face_preds(gen, 2, priors)
    drop_in = compat_retinaface.MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)
    loss_l, loss_c, loss_landm = drop_in(tuple(preds), priors, targets)
    finite_grads(2 * loss_l + loss_c + loss_landm, preds)
    boxes, has, valid, landmarks = detloss.pad_ground_truth(
        [t[:, :4] for t in targets], [(t[:, 14] > 0).long() for t in targets], [t[:, 4:14] for t in targets]
    )
    out = detloss.RetinaFaceLoss()(*preds, priors, boxes, landmarks, has > 0, valid)
    finite_grads(out["loss"], preds)


def test_retinaface_320_matches_the_float64_oracle():
    """At 320 px (priors up to 1.6 image widths) the loss equals the float64 reference."""
    priors = retinaface_priors(320).double()
    gen = torch.Generator().manual_seed(320)
    targets = [face_targets(gen, 6, outside=True), face_targets(gen, 2), face_targets(gen, 0)]
    boxes, has, valid, landmarks = detloss.pad_ground_truth(
        [t[:, :4].double() for t in targets], [(t[:, 14] > 0).long() for t in targets],
        [t[:, 4:14].double() for t in targets],
    )
    loc, conf, landm = (p.detach().double() for p in face_preds(gen, 3, priors))
    args = (loc, conf, landm, priors, boxes, landmarks, has > 0, valid)
    out = detloss.RetinaFaceLoss(box_weight=1.0)(*args, return_assignment=True)
    ref = oracle.retinaface_loss(*(a.numpy() for a in args))
    assert ref["positive"].any() and (priors[:, 2] > 1).any()  # the case is the one the issue found
    np.testing.assert_array_equal(out["assignment"].positive.numpy(), ref["positive"])
    for key in ("loss_box", "loss_cls", "loss_landmark"):
        np.testing.assert_allclose(out[key].item(), ref[key], rtol=1e-9, atol=1e-12)
    # the drop-in gives the same three terms (its quirk option changes nothing in this case)
    drop_in = compat_retinaface.MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)
    rows = [torch.cat((t[:, :4], t[:, 4:14], t[:, 14:]), 1).double() for t in targets]
    loss_l, loss_c, loss_landm = drop_in((loc, conf, landm), priors, rows)
    ref_quirk = oracle.retinaface_loss(*(a.numpy() for a in args), ignored_gt_claims_prior=True,
                                       drop_degenerate_gt=False)
    for got, key in zip((loss_l, loss_c, loss_landm), ("loss_box", "loss_cls", "loss_landmark")):
        np.testing.assert_allclose(got.item(), ref_quirk[key], rtol=1e-9, atol=1e-12)


def test_pixel_priors_are_still_named():
    priors = retinaface_priors(320) * 320  # pixel boxes: centres in the hundreds
    gen = torch.Generator().manual_seed(0)
    drop_in = compat_retinaface.MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)
    with pytest.raises(ValueError, match="priors: expected normalised coordinates.*divide pixel boxes"):
        drop_in(tuple(face_preds(gen, 1, priors)), priors, [face_targets(gen, 2)])
    zero_size = retinaface_priors(320)
    zero_size[5, 2] = 0.0
    with pytest.raises(ValueError, match="priors: expected widths and heights > 0"):
        drop_in(tuple(face_preds(gen, 1, zero_size)), zero_size, [face_targets(gen, 2)])


@pytest.mark.parametrize("preset", ["voc300", "coco300", "voc512"])
def test_ssd_presets_with_ground_truth_outside_the_image(preset):
    priors = ssd_priors(preset)
    gen = torch.Generator().manual_seed(1)
    p = priors.shape[0]
    preds = [torch.randn(2, p, 4, generator=gen).requires_grad_(), torch.randn(2, p, 21, generator=gen).requires_grad_()]
    targets = [torch.tensor([[-0.3, 0.1, 0.4, 0.5, 3.0], [0.6, 0.7, 1.2, 1.1, 7.0]]), torch.zeros(0, 5)]
    loss_l, loss_c = ssd_pytorch.MultiBoxLoss(21, 0.5, True, 0, True, 3, 0.5, False)((*preds, priors), targets)
    finite_grads(loss_l + loss_c, preds)
    boxes, labels, valid = detloss.pad_ground_truth([t[:, :4] for t in targets], [t[:, 4].long() for t in targets])
    out = detloss.SSDLoss(21)(*preds, priors, boxes, labels, valid)
    finite_grads(out["loss"], preds)


@pytest.mark.parametrize("size", [128, 320, 640, 1024])
def test_yolov3_grids_with_boxes_cut_by_the_image_border(size):
    gen = torch.Generator().manual_seed(size)
    num_classes = 3
    strides = (8, 16, 32)
    heads = [torch.randn(1, size // s, size // s, 3 * (5 + num_classes), generator=gen).requires_grad_() for s in strides]
    # a box sticking out on the left (centre inside), one covering the image, one ordinary
    boxes = torch.tensor([[-20.0, 10, 40, 90], [0, 0, size, size], [size * 0.5, size * 0.4, size * 0.7, size * 0.9]])
    labels = torch.tensor([0, 1, 2])
    out = detloss.YOLOv3Loss(num_classes)(heads, boxes[None], labels[None], torch.ones(1, 3, dtype=torch.bool))
    finite_grads(out["loss"], heads)
    anchors = yolov3_anchors(grid_units=True).numpy()
    drop_in = tensorflow_yolov3.YOLOv3Loss(num_classes, anchors, strides)
    rows = np.concatenate((boxes.numpy(), labels.numpy()[:, None]), 1)
    targets = tensorflow_yolov3.preprocess_true_boxes(rows, size, strides, anchors, num_classes)
    labels_t = [torch.as_tensor(t[None]).float() for t in targets[:3]]
    trues_t = [torch.as_tensor(t[None]).float() for t in targets[3:]]
    giou, conf, prob = drop_in.compute_loss(*heads, *labels_t, *trues_t)
    finite_grads(giou + conf + prob, heads)


@pytest.mark.parametrize("feature", [(8, 8), (20, 30), (64, 64)])
def test_faster_rcnn_anchors_for_small_and_large_feature_maps(feature):
    height, width = feature
    anchors = rcnn_anchors(height, width, feat_stride=16)  # 128 px to 1024 px images
    image = (height * 16, width * 16)
    gen = torch.Generator().manual_seed(height)
    a = anchors.shape[0]
    gt = torch.tensor([[[-10.0, 20, 90, 120], [image[1] * 0.5, image[0] * 0.5, image[1] + 30.0, image[0] * 0.9]]])
    preds = [torch.randn(1, a, 2, generator=gen).requires_grad_(), torch.randn(1, a, 4, generator=gen).requires_grad_()]
    out = detloss.RPNLoss()(*preds[::-1], anchors, gt, torch.ones(1, 2, dtype=torch.bool), image)
    finite_grads(out["loss"], preds)
    score = np.zeros((1, height, width, 18), dtype=np.float32)
    rows = np.concatenate((gt[0].numpy(), np.ones((2, 1), dtype=np.float32)), 1)
    labels, targets, inside, outside = tf_faster_rcnn.anchor_target_layer(
        score, rows, np.array([image[0], image[1], 1.0]), 16, anchors.numpy(), 9
    )
    # at 128 px every default anchor (128-512 px) crosses the border and is dropped (-1), as in the original
    assert np.isin(labels, (-1, 0, 1)).all() and np.isfinite(targets).all()
    assert (labels == 1).any() == (height > 8)


@pytest.mark.parametrize("size", [128, 320, 640, 1024])
def test_retinanet_anchors_at_every_size(size):
    anchors = retinanet_anchors(size)
    gen = torch.Generator().manual_seed(size)
    a = anchors.shape[0]
    gt = torch.tensor([[[-8.0, 4, size * 0.3, size * 0.4], [size * 0.2, size * 0.1, size + 16.0, size * 0.95]]])
    preds = [torch.randn(1, a, 3, generator=gen).requires_grad_(), torch.randn(1, a, 4, generator=gen).requires_grad_()]
    out = detloss.RetinaNetLoss(3)(*preds[::-1], anchors, gt, torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.bool))
    finite_grads(out["loss"], preds)
