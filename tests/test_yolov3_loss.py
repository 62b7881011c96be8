"""Native YOLOv3Loss: golden parity, oracle properties, gradcheck, edge cases, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import YOLOv3Loss
from detloss.matching.yolo_ignore import yolo_max_iou
from detloss.priors import yolov3_anchors
from oracles import yolov3 as oracle

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

CASES = oracle.GOLDEN_CASES
STRIDES = (8, 16, 32)
ANCHORS = yolov3_anchors(grid_units=True, dtype=torch.float64)
TERMS = [("loss_box", "giou"), ("loss_obj", "conf"), ("loss_cls", "prob")]

def golden_inputs(d):
    gt, counts = d["in_gt_boxes"], d["in_gt_count"]
    valid = torch.arange(gt.shape[1])[None] < torch.as_tensor(counts)[:, None]
    boxes = torch.where(valid[..., None], torch.as_tensor(gt[..., :4], dtype=torch.float32), 0.0)
    labels = torch.where(valid, torch.as_tensor(gt[..., 4], dtype=torch.int64), 0)
    convs = [torch.tensor(d[f"in_conv_{k}bbox"], requires_grad=True) for k in "sml"]
    loss = YOLOv3Loss(int(d["cfg_num_class"]), anchors=torch.as_tensor(d["cfg_anchors"]),
                      ignore_iou=float(d["cfg_iou_loss_thresh"]), faithful_fallback_clip=True,
                      max_log_scale=float("inf"))
    return loss, convs, boxes, labels, valid


@pytest.mark.parametrize("case", CASES)
def test_golden_losses_and_intermediates(golden, case):
    d = golden(f"tf/{case}.npz")
    loss, convs, boxes, labels, valid = golden_inputs(d)
    out = loss(convs, boxes, labels, valid, return_assignment=True)
    for key, name in TERMS:
        np.testing.assert_allclose(out[key].item(), d[f"out_{name}_loss"], rtol=1e-5)
    np.testing.assert_allclose(out["loss"].item(), d["out_total_loss"], rtol=1e-5)
    a = out["assignment"]
    for s, k in enumerate("sml"):
        np.testing.assert_array_equal(a.respond[s].numpy(), d[f"mid_respond_bbox_{k}bbox"].astype(bool))
        np.testing.assert_allclose(a.max_iou[s].numpy(), d[f"mid_max_iou_{k}bbox"], rtol=1e-5, atol=1e-5)
        want_bg = (1 - d[f"mid_respond_bbox_{k}bbox"]) * (d[f"mid_max_iou_{k}bbox"] < 0.5)
        np.testing.assert_array_equal(a.background[s].numpy(), want_bg.astype(bool))


def _golden_grads(golden, case):
    d = golden(f"tf/{case}.npz")
    loss, convs, boxes, labels, valid = golden_inputs(d)
    loss(convs, boxes, labels, valid)["loss"].backward()
    return d, convs


@pytest.mark.parametrize("case", CASES)
def test_golden_gradients_at_nonzero_logits(golden, case):
    d, convs = _golden_grads(golden, case)
    for s, k in enumerate("sml"):
        oracle.assert_grad_close(convs[s].grad, d[f"out_grad_conv_{k}bbox"], mask=d[f"in_conv_{k}bbox"] != 0)


@pytest.mark.parametrize("case", CASES)
def test_golden_gradients_everywhere(golden, case):
    d, convs = _golden_grads(golden, case)
    for s, k in enumerate("sml"):
        oracle.assert_grad_close(convs[s].grad, d[f"out_grad_conv_{k}bbox"])


def random_problem(rng, size, batch, num_classes, counts, dtype=torch.float64, scale=0.5):
    grid = [size // s for s in STRIDES]
    convs = [torch.tensor(rng.normal(0, scale, (batch, g, g, 3 * (5 + num_classes))), dtype=dtype) for g in grid]
    m = max(counts + [0])
    arr = np.zeros((batch, m, 5))
    for b, n in enumerate(counts):
        xy = rng.integers(0, size, (n, 2, 2))
        arr[b, :n, 0:4:2] = np.sort(xy[:, 0], axis=1)
        arr[b, :n, 1:4:2] = np.sort(xy[:, 1], axis=1)
        arr[b, :n, 4] = rng.integers(0, num_classes, n)
    valid = torch.arange(m)[None] < torch.as_tensor(counts)[:, None]
    return convs, arr, valid


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31), size=st.sampled_from([64, 96]), num_classes=st.integers(1, 3),
    counts=st.lists(st.integers(0, 5), min_size=1, max_size=2), box_loss=st.sampled_from(["giou", "diou", "ciou"]),
    normalizer=st.sampled_from(["batch", "num_pos"]), smoothing=st.sampled_from([0.0, 0.01]),
)
def test_matches_oracle(seed, size, num_classes, counts, box_loss, normalizer, smoothing):
    rng = np.random.default_rng(seed)
    convs, arr, valid = random_problem(rng, size, len(counts), num_classes, counts)
    loss = YOLOv3Loss(num_classes, anchors=ANCHORS, box_loss=box_loss, normalize_by=normalizer,
                      label_smoothing=smoothing)
    got = loss(convs, torch.as_tensor(arr[..., :4]), torch.as_tensor(arr[..., 4]).long(), valid)
    want = oracle.yolov3_loss([c.numpy() for c in convs], arr[..., :4], arr[..., 4].astype(int), counts,
                              num_classes=num_classes, anchors=ANCHORS.numpy(), strides=STRIDES,
                              box_loss=box_loss, normalize_by=normalizer, label_smoothing=smoothing)
    for key in ("loss_box", "loss_obj", "loss_cls", "loss"):
        np.testing.assert_allclose(got[key].item(), want[key], rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), counts=st.lists(st.integers(40, 48), min_size=1, max_size=1))
def test_matches_oracle_crowded(seed, counts):
    rng = np.random.default_rng(seed)
    convs, arr, valid = random_problem(rng, 64, 1, 2, counts)
    got = YOLOv3Loss(2, anchors=ANCHORS)(convs, torch.as_tensor(arr[..., :4]), torch.as_tensor(arr[..., 4]).long(),
                                         valid)
    want = oracle.yolov3_loss([c.numpy() for c in convs], arr[..., :4], arr[..., 4].astype(int), counts,
                              num_classes=2, anchors=ANCHORS.numpy(), strides=STRIDES)
    np.testing.assert_allclose(got["loss"].item(), want["loss"], rtol=1e-6)


def test_crowded_image_matches_oracle():
    rng = np.random.default_rng(7)
    for counts in ([45], [41, 0]):
        convs, arr, valid = random_problem(rng, 96, len(counts), 3, counts)
        got = YOLOv3Loss(3, anchors=ANCHORS)(convs, torch.as_tensor(arr[..., :4]),
                                             torch.as_tensor(arr[..., 4]).long(), valid)
        want = oracle.yolov3_loss([c.numpy() for c in convs], arr[..., :4], arr[..., 4].astype(int), counts,
                                  num_classes=3, anchors=ANCHORS.numpy(), strides=STRIDES)
        for key in ("loss_box", "loss_obj", "loss_cls"):
            np.testing.assert_allclose(got[key].item(), want[key], rtol=1e-6, err_msg=key)


def _gradcheck_problem():
    rng = np.random.default_rng(3)
    convs, arr, valid = random_problem(rng, 32, 1, 1, [2])
    convs = [c.requires_grad_() for c in convs]
    return convs, torch.as_tensor(arr[..., :4]), torch.as_tensor(arr[..., 4]).long(), valid


@pytest.mark.parametrize("box_loss", ["giou", "diou"])
def test_gradcheck_box_losses(box_loss):
    convs, boxes, labels, valid = _gradcheck_problem()
    loss = YOLOv3Loss(1, anchors=ANCHORS, box_loss=box_loss, obj_weight=0.0, cls_weight=0.0)
    assert loss(convs, boxes, labels, valid)["loss_box"].item() > 0
    assert torch.autograd.gradcheck(lambda *c: loss(list(c), boxes, labels, valid)["loss"], tuple(convs))
    full = YOLOv3Loss(1, anchors=ANCHORS, box_loss=box_loss)
    assert torch.autograd.gradcheck(lambda *c: full(list(c), boxes, labels, valid)["loss"], tuple(convs))


@pytest.mark.parametrize("term", ["loss_box", "loss_obj", "loss_cls"])
def test_gradcheck_each_term_alone(term):
    # backpropagating one term leaves the head gather's other outputs without a gradient
    convs, boxes, labels, valid = _gradcheck_problem()
    loss = YOLOv3Loss(1, anchors=ANCHORS)
    assert torch.autograd.gradcheck(lambda *c: loss(list(c), boxes, labels, valid)[term], tuple(convs))


def test_gradcheck_ciou_with_detached_tradeoff():
    """detloss.boxes detaches CIoU's alpha (as the CIoU authors' code): the analytic gradient is
    that of ``diou - const * v``. Check it against finite differences of that function."""
    convs, boxes, labels, valid = _gradcheck_problem()
    ciou = YOLOv3Loss(1, anchors=ANCHORS, box_loss="ciou", obj_weight=0.0, cls_weight=0.0)
    diou = YOLOv3Loss(1, anchors=ANCHORS, box_loss="diou", obj_weight=0.0, cls_weight=0.0)
    (g_ciou,) = torch.autograd.grad(ciou(convs, boxes, labels, valid)["loss"], convs[:1])
    (g_diou,) = torch.autograd.grad(diou(convs, boxes, labels, valid)["loss"], convs[:1])
    assert torch.isfinite(g_ciou).all()
    # The aspect term only moves t_w, t_h (channels 2, 3 of each anchor); t_x, t_y match DIoU's.
    per_anchor = lambda g: g.reshape(*g.shape[:3], 3, 6)  # noqa: E731
    torch.testing.assert_close(per_anchor(g_ciou)[..., :2], per_anchor(g_diou)[..., :2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(per_anchor(g_ciou)[..., 2:4], per_anchor(g_diou)[..., 2:4])


def test_empty_images_only_background_objectness():
    rng = np.random.default_rng(0)
    convs, arr, valid = random_problem(rng, 64, 2, 2, [0, 0], dtype=torch.float32)
    convs = [c.requires_grad_() for c in convs]
    out = YOLOv3Loss(2)(convs, torch.as_tensor(arr[..., :4], dtype=torch.float32),
                        torch.as_tensor(arr[..., 4]).long(), valid)
    assert out["loss_box"].item() == 0 and out["loss_cls"].item() == 0
    out["loss"].backward()
    x = torch.cat([c.detach().reshape(2, -1, 7)[..., 4].flatten() for c in convs])
    p = torch.sigmoid(x.double())
    want = (p**2 * torch.nn.functional.softplus(x.double())).sum() / 2
    np.testing.assert_allclose(out["loss_obj"].item(), want.item(), rtol=1e-5)
    assert all(torch.isfinite(c.grad).all() for c in convs)


def test_half_precision_and_degenerate_boxes_are_finite():
    rng = np.random.default_rng(1)
    convs, arr, valid = random_problem(rng, 64, 2, 2, [3, 2], dtype=torch.float16, scale=8.0)
    arr[0, 0, :4] = [10, 10, 10, 10]  # zero-size box
    arr[1, 0, :4] = [0, 0, 64, 64]  # whole image
    convs = [c.requires_grad_() for c in convs]
    out = YOLOv3Loss(2)(convs, torch.as_tensor(arr[..., :4], dtype=torch.float16),
                        torch.as_tensor(arr[..., 4]).long(), valid)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(c.grad.float()).all() for c in convs)


def test_nchw_layout_equals_nhwc():
    rng = np.random.default_rng(2)
    convs, arr, valid = random_problem(rng, 64, 2, 3, [3, 1])
    args = (torch.as_tensor(arr[..., :4]), torch.as_tensor(arr[..., 4]).long(), valid)
    def grads(layout, maps):
        leaves = [m.detach().clone().requires_grad_() for m in maps]
        out = YOLOv3Loss(3, layout=layout)(leaves, *args)
        out["loss"].backward()
        return out, [leaf.grad for leaf in leaves]

    a, grad_a = grads("nhwc", convs)
    # channels-first storage: a permuted NCHW map, and a non-contiguous NHWC view of NCHW storage
    b, grad_b = grads("nchw", [c.permute(0, 3, 1, 2).contiguous() for c in convs])
    c, grad_c = grads("nhwc", [c.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) for c in convs])
    for key in ("loss_box", "loss_obj", "loss_cls", "loss"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a[key], c[key], rtol=1e-12, atol=1e-12)
    for ga, gb, gc in zip(grad_a, grad_b, grad_c):
        torch.testing.assert_close(ga, gb.permute(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gc, rtol=1e-12, atol=1e-12)


def test_weights_and_num_pos_normalizer():
    rng = np.random.default_rng(4)
    convs, arr, valid = random_problem(rng, 64, 2, 2, [3, 2])
    args = (torch.as_tensor(arr[..., :4]), torch.as_tensor(arr[..., 4]).long(), valid)
    base = YOLOv3Loss(2)(convs, *args, return_assignment=True)
    weighted = YOLOv3Loss(2, box_weight=2.0, obj_weight=0.5, cls_weight=0.0)(convs, *args)
    torch.testing.assert_close(weighted["loss"], 2 * base["loss_box"] + 0.5 * base["loss_obj"])
    n_pos = sum(int(r.sum()) for r in base["assignment"].respond)
    per_pos = YOLOv3Loss(2, normalize_by="num_pos")(convs, *args)
    torch.testing.assert_close(per_pos["loss"], base["loss"] * 2 / n_pos)


def test_max_iou_chunking_is_exact():
    rng = np.random.default_rng(5)
    pred = torch.tensor(rng.uniform(5, 60, (2, 300, 4)))
    true = torch.tensor(rng.uniform(5, 60, (2, 40, 4)))
    valid = torch.tensor(rng.random((2, 40)) < 0.7)
    full = yolo_max_iou(pred, true, valid, chunk_elements=10**9)
    chunked = yolo_max_iou(pred, true, valid, chunk_elements=2 * 40 * 7)
    torch.testing.assert_close(full, chunked, rtol=0, atol=0)
    for b in range(2):  # padding rows (valid False) never count
        kept = true[b].numpy()[valid[b].numpy()]
        want = [max([oracle.iou_cxcywh(p, t) for t in kept], default=0.0) for p in pred[b].numpy()]
        np.testing.assert_allclose(full[b].numpy(), want, rtol=1e-12, atol=1e-12)
    empty = yolo_max_iou(pred, true[:, :0], valid[:, :0])
    assert empty.shape == (2, 300) and float(empty.abs().sum()) == 0


def test_max_iou_of_several_scales_equals_one_call_per_scale():
    # each cell is compared with its own scale's true boxes only; a scale whose boxes are all
    # invalid (or that has no cells) gives 0
    rng = np.random.default_rng(8)
    sizes = [70, 0, 23, 9]
    pred = torch.tensor(rng.uniform(5, 60, (3, sum(sizes), 4)))
    true = torch.tensor(rng.uniform(5, 60, (3, 6, 4)))
    valid = torch.tensor(rng.random((3, len(sizes), 6)) < 0.5)
    valid[:, 3] = False
    got = yolo_max_iou(pred, true, valid, scale_sizes=sizes, chunk_elements=50)
    parts = [yolo_max_iou(p, true, valid[:, s]) for s, p in enumerate(pred.split(sizes, dim=1))]
    torch.testing.assert_close(got, torch.cat(parts, dim=1), rtol=0, atol=0)
    assert (got[:, -9:] == 0).all() and (got > 0).any()
    with pytest.raises(ValueError, match="scale_sizes"):
        yolo_max_iou(pred, true, valid, scale_sizes=[70, 23, 9])
    with pytest.raises(ValueError, match="true_valid"):
        yolo_max_iou(pred, true, valid[:, :3], scale_sizes=sizes)


@pytest.mark.slow
def test_compiles_fullgraph():
    rng = np.random.default_rng(6)
    convs, arr, valid = random_problem(rng, 64, 2, 2, [3, 1], dtype=torch.float32)
    args = (torch.as_tensor(arr[..., :4], dtype=torch.float32), torch.as_tensor(arr[..., 4]).long(), valid)
    loss = YOLOv3Loss(2)
    eager = loss(convs, *args)["loss"]
    compiled = torch.compile(lambda c, *a: loss(c, *a)["loss"], fullgraph=True)
    torch.testing.assert_close(compiled(convs, *args), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ("channels", "outputs\\[0\\]: expected shape"),
        ("batch", "B=2"),
        ("scales", "outputs: expected a sequence of 3"),
        ("spatial", "outputs\\[1\\]: expected spatial size"),
        ("label", "gt_labels"),
        ("outside", "gt_boxes centre x"),
    ],
)
def test_bad_input_errors(change, match):
    rng = np.random.default_rng(8)
    convs, arr, valid = random_problem(rng, 64, 2, 2, [2, 1])
    boxes, labels = torch.as_tensor(arr[..., :4]), torch.as_tensor(arr[..., 4]).long()
    if change == "channels":
        convs[0] = convs[0][..., :-1]
    elif change == "batch":
        convs[2] = convs[2][:1]
    elif change == "scales":
        convs = convs[:2]
    elif change == "spatial":
        convs[1] = convs[1][:, :3, :3]
    elif change == "label":
        labels[0, 0] = 2
    elif change == "outside":
        boxes[0, 0, 0::2] = torch.tensor([66.0, 90.0])  # centre x 78 > 64
    with pytest.raises(ValueError, match=match):
        YOLOv3Loss(2)(convs, boxes, labels, valid)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="box_loss"):
        YOLOv3Loss(2, box_loss="l1")
    with pytest.raises(ValueError, match="anchors"):
        YOLOv3Loss(2, anchors=torch.ones(3, 2))
    with pytest.raises(ValueError, match="layout"):
        YOLOv3Loss(2, layout="chw")


# ---------------------------------------------------------------- fused objectness focal BCE
def _plain_objectness(x, t, w):
    from detloss.functional import sigmoid_focal_loss
    return sigmoid_focal_loss(x, t, alpha=-1.0, gamma=2.0, weight=w, reduction="sum")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 40), scale=st.sampled_from([0.5, 4.0, 30.0]),
       soft=st.booleans())
def test_fused_objectness_equals_plain_composition(seed, n, scale, soft):
    from detloss.functional.yolo_objectness import yolo_objectness_focal_loss
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, n, generator=g, dtype=torch.float64) * scale).requires_grad_()
    x.data[:, :2] = 0.0  # the where-based BCE gradient at logit 0
    t = torch.rand(2, n, generator=g, dtype=torch.float64) if soft else (torch.rand(2, n, generator=g) < 0.3).double()
    w = (torch.rand(2, n, generator=g) < 0.7).double() * 1.5
    got, want = yolo_objectness_focal_loss(x, t, w), _plain_objectness(x, t, w)
    (g_got,), (g_want,) = torch.autograd.grad(got, x), torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_fused_objectness_gradcheck_and_half_input():
    from detloss.functional.yolo_objectness import yolo_objectness_focal_loss
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 17, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = (torch.rand(3, 17, generator=g) < 0.4).double()
    w = torch.rand(3, 17, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: yolo_objectness_focal_loss(v, t, w), (x,))
    xh = x.detach().half().requires_grad_()
    th, wh = t.half(), w.half()
    got = yolo_objectness_focal_loss(xh, th, wh)
    want = _plain_objectness(xh.float(), th.float(), wh.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    got.backward()
    assert xh.grad.dtype == torch.float16 and torch.isfinite(xh.grad).all()
    # targets that require grad fall back to the composition, which differentiates them too
    tt = t.clone().requires_grad_()
    yolo_objectness_focal_loss(x, tt, w).backward()
    assert tt.grad is not None
    with pytest.raises(ValueError, match="weight"):
        yolo_objectness_focal_loss(x, t, w[:, :3])


def test_reused_module_follows_input_size_and_dtype_and_keeps_its_anchors():
    """One module called on a sequence of problems (input sizes, dtypes) equals fresh modules:
    nothing of one call leaks into the next. Its anchors are fixed at construction: changing
    the tensor it hands out changes nothing."""
    rng = np.random.default_rng(7)
    kept = YOLOv3Loss(2, anchors=ANCHORS.clone())

    def check(size, dtype):
        convs, arr, valid = random_problem(rng, size, 2, 2, [3, 1], dtype=dtype)
        args = (torch.as_tensor(arr[..., :4], dtype=dtype), torch.as_tensor(arr[..., 4]).long(), valid)
        fresh = YOLOv3Loss(2, anchors=kept.anchors.clone())
        got, want = kept(convs, *args), fresh(convs, *args)
        for key in ("loss_box", "loss_obj", "loss_cls"):
            assert torch.equal(got[key], want[key]), (size, dtype, key)

    check(64, torch.float64)
    check(96, torch.float64)
    check(96, torch.float32)
    with torch.no_grad():
        kept.anchors.mul_(1.5)  # a copy: the module's anchors stay
    torch.testing.assert_close(kept.anchors, ANCHORS.float())
    check(96, torch.float32)


def test_gather_heads_equal_plain_indexing_values_and_gradients():
    # two heads, one NHWC and one a permuted NCHW view, with a repeated candidate cell
    from detloss.functional.yolo_heads import gather_heads

    g = torch.Generator().manual_seed(9)
    nhwc = torch.randn(2, 3, 4, 2, 7, generator=g, dtype=torch.float64, requires_grad=True)
    nchw = torch.randn(2, 2, 7, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    heads = [nhwc, nchw.permute(0, 3, 4, 1, 2)]
    cells = [torch.tensor([[0, 5, 5], [23, 1, 7]]), torch.tensor([[11, 0], [3, 3]])]
    box, obj, cls, all_boxes = gather_heads(heads, cells)
    picked = [h.flatten(1, 3)[torch.arange(2)[:, None], c] for h, c in zip(heads, cells)]
    want_box = torch.cat([p[..., :4] for p in picked], 1)
    want_cls = torch.cat([p[..., 5:] for p in picked], 1)
    want_obj = torch.cat([h[..., 4].flatten(1) for h in heads], 1)
    assert torch.equal(box, want_box) and torch.equal(cls, want_cls) and torch.equal(obj, want_obj)
    assert torch.equal(all_boxes, torch.cat([h[..., :4].flatten(1, 3) for h in heads], 1))
    assert not all_boxes.requires_grad
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (box, obj, cls)]
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip((box, obj, cls), weights)), (nhwc, nchw))
    want = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip((want_box, want_obj, want_cls), weights)), (nhwc, nchw)
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert got[1].stride() == nchw.stride()  # the NCHW map's gradient keeps its layout
