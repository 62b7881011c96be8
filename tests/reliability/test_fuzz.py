"""Hypothesis fuzz: no NaN/inf in any native loss or its gradients.

Random and degenerate GT boxes (zero / negative size, outside the image, duplicates), empty
images, predictions up to +/-1e4, float32 / float16 / bfloat16 predictions, batch 1-3. Each
example is tiny (48 priors, 128 anchors or a 64x64 YOLO input). The default suite runs
``EXAMPLES`` = 300 examples per family, 2,100 in all; the slow run 1,430 per family, 10,010.

Zero-area GT boxes (points) with half-precision predictions are included: the IoU-family
ratios give 0 with zero gradient where their denominator vanishes, so no 1/eps gradient
overflows float16 (``test_failure_modes.py::test_fm08_yolo_point_gt_half``).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .cases import FAMILIES, IMAGE, NORMALISED, loss_and_grads, make_case, scalar_items

pytestmark = pytest.mark.usefixtures("strategy", "single_thread")  # every test under both execution strategies


EXAMPLES = 300
SLOW_EXAMPLES = 1430
GT_INDEX = {"ssd": 3, "retinaface": 4, "yolov3": 1, "retinanet": 3, "rpn": 3, "faster_rcnn": 3, "yolov8": 4}

coordinate = st.one_of(
    st.floats(-0.25, 1.25, allow_nan=False, width=32),
    st.sampled_from([0.0, 0.5, 1.0]),  # exact values make zero-size boxes and duplicates
)
box = st.tuples(coordinate, coordinate, coordinate, coordinate)


@st.composite
def fuzz_inputs(draw):
    batch = draw(st.integers(1, 3))
    counts = draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch))
    boxes = draw(st.lists(box, min_size=sum(counts), max_size=sum(counts)))
    return dict(
        batch=batch,
        counts=counts,
        boxes=boxes,
        degenerate=draw(st.booleans()),
        logit_scale=draw(st.sampled_from([1.0, 30.0, 1e3, 1e4])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])),
        seed=draw(st.integers(0, 2**16)),
        use_drawn_boxes=draw(st.booleans()),
    )


def check_example(family: str, x: dict) -> None:
    case = make_case(
        family, batch=x["batch"], num_gt=x["counts"], degenerate=x["degenerate"] and family != "yolov3",
        logit_scale=x["logit_scale"], dtype=x["dtype"], seed=x["seed"],
    )
    index = GT_INDEX.get(family)
    if x["use_drawn_boxes"] and index is not None and sum(x["counts"]):
        gt = case.args[index].clone()
        drawn = iter(x["boxes"])
        for i, n in enumerate(x["counts"]):
            for j in range(n):
                gt[i, j] = torch.tensor(next(drawn))
        if family == "yolov3":  # YOLO rejects inverted boxes and boxes outside the input by design
            gt = gt.clamp(0, 1)
            gt = torch.cat((torch.minimum(gt[..., :2], gt[..., 2:]), torch.maximum(gt[..., :2], gt[..., 2:])), -1)
        if family not in NORMALISED:
            gt = gt * IMAGE
        case.args[index] = gt
    out, grads = loss_and_grads(case)
    for k, v in scalar_items(out).items():
        assert torch.isfinite(v), f"{family} {k} = {v}"
    for i, g in enumerate(grads):
        assert torch.isfinite(g.float()).all(), f"{family}: gradient of prediction {i} not finite"


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=fuzz_inputs())
def test_fuzz_finite(family, x):
    check_example(family, x)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=fuzz_inputs())
def test_fuzz_finite_long(family, x):
    check_example(family, x)
