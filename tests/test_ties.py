"""Gradients at ties and boundaries are the library's own rule, not the torch release's.

torch 2.14 changed ``clamp(min=0)``'s gradient at 0 from 1 to 0; parity with the TensorFlow
originals (``maximum(x, 0.0)`` passes the gradient to ``x`` on a tie) must hold on every torch
the package declares. Each expected gradient below is derived by hand in the comment.
"""
from __future__ import annotations

import torch

from detloss import aligned_box_iou, box_area
from detloss._ties import at_least, tf_maximum, tf_minimum
from detloss.functional import probability_cross_entropy


def grad_of(fn, *values: float) -> list[torch.Tensor]:
    xs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    fn(*xs).sum().backward()
    return [x.grad for x in xs]


def test_at_least_passes_the_gradient_on_the_boundary():
    (g,) = grad_of(lambda x: at_least(x, 0.0), [-1.0, 0.0, 2.0])
    assert g.tolist() == [0.0, 1.0, 1.0]
    assert torch.isnan(at_least(torch.tensor([float("nan")]), 0.0)).all()  # never a silent 0
    assert at_least(torch.tensor([-3.0, 0.5], dtype=torch.float16), 0.0).dtype == torch.float16


def test_tf_minimum_and_maximum_give_ties_to_the_first_argument():
    gx, gy = grad_of(tf_minimum, [1.0, 0.0], [1.0, 2.0])
    assert gx.tolist() == [1.0, 1.0] and gy.tolist() == [0.0, 0.0]
    gx, gy = grad_of(tf_maximum, [1.0, 0.0], [1.0, 2.0])
    assert gx.tolist() == [1.0, 0.0] and gy.tolist() == [0.0, 1.0]


def test_box_area_of_a_zero_width_box_has_the_height_as_gradient():
    # area = max(x2 - x1, 0) * max(y2 - y1, 0); at x2 == x1 the width passes its gradient:
    # d area / d x2 = height = 3, d area / d x1 = -3.
    (g,) = grad_of(lambda b: box_area(b), [[1.0, 0.0, 1.0, 3.0]])
    assert g.tolist() == [[-3.0, 0.0, 3.0, 0.0]]


def test_touching_boxes_get_an_iou_gradient_from_the_intersection():
    # a = [0, 0, 1, 1], b = [1, 0, 2, 1] touch along x = 1: inter_w = min(1, 2) - max(0, 1) = 0.
    # With the gradient kept at inter_w == 0: IoU = inter / union, union = 2, inter = inter_w * 1,
    # so d IoU / d a_x2 = (d inter_w / d a_x2) * 1 / union = 1 / 2 (the union's own term is
    # multiplied by inter = 0). With tf ties ("first") min(a_x2, b_x2) = a_x2 gets it.
    ga, gb = grad_of(lambda a, b: aligned_box_iou(a, b, "iou", ties="first"), [[0.0, 0, 1, 1]], [[1.0, 0, 2, 1]])
    assert ga[0, 2].item() == 0.5 and gb[0, 0].item() == -0.5


def test_probability_floor_passes_the_gradient_at_eps():
    # loss = -t * log(max(p, eps)); at p == eps the gradient goes to p: -t / eps.
    eps = 0.25
    (g,) = grad_of(lambda p: probability_cross_entropy(p, torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                                                       eps=eps, reduction="sum"), [[0.25, 0.75]])
    assert g.tolist() == [[-4.0, 0.0]]
