"""Reliability of the real-time DETR families (``rt_detr``, ``d_fine`` in :mod:`.cases`):
autocast fp16 / bf16 with overflowing predictions, determinism, and bad input. Their
``torch.compile(fullgraph=True)`` (the Hungarian solve the one opaque operator) and 2-process gloo
gradients are checked with every other family's, in ``test_compile.py`` and ``test_distributed.py``."""
from __future__ import annotations

import pytest
import torch

from .cases import RT_DETR_FAMILIES, loss_and_grads, make_case, scalar_items

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", RT_DETR_FAMILIES)
def test_autocast_low_precision_predictions(family, dtype):
    """Low-precision predictions under autocast: float32 terms close to the float32 run."""
    ref, _ = loss_and_grads(make_case(family, seed=71).leaves())
    case = make_case(family, seed=71).leaves(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(case)
    for k, v in scalar_items(out).items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", RT_DETR_FAMILIES)
def test_autocast_overflowed_predictions_do_not_crash(family, dtype):
    """Logits that overflowed to inf (fp16) or huge (bf16), a NaN box and a NaN logit: the matcher
    gets a defined assignment, the loss is returned, non-finite, and nothing raises."""
    case = make_case(family, seed=72, logit_scale=1e6).leaves(dtype)
    boxes = case.args[0].detach().clone()
    boxes[0, 0, 0, 0] = float("nan")
    case.args[0] = boxes.requires_grad_(True)
    logits = case.args[1].detach().clone()
    logits[1, 0, 2, 0] = float("nan")  # every query takes part in the class term: the loss is NaN
    case.args[1] = logits.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(case)
    assert out["loss"].dtype == torch.float32
    assert not torch.isfinite(out["loss"])  # a GradScaler skips this step


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("family", RT_DETR_FAMILIES)
def test_deterministic(family):
    case = make_case(family, seed=74, num_gt=[4, 1])
    a, ga = loss_and_grads(case.leaves())
    b, gb = loss_and_grads(case.leaves())
    for k, v in scalar_items(a).items():
        assert torch.equal(v, b[k]), k
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# ------------------------------------------------------------------------------ bad input
def _call(family, index, change):
    def run():
        case = make_case(family, seed=76)
        case.args[index] = change(case.args[index])
        case.call()
    return run


BAD = [
    ("labels-out-of-range", 3, lambda t: t + 3, r"gt_labels: expected values in \[0, 2\]"),
    ("pixel-gt-boxes", 2, lambda t: t * 640, r"gt_boxes: expected normalised coordinates"),
    ("logits-class-count", 1, lambda t: t[..., :2], r"cls_logits: expected shape \(L=3, B=2, Q=6, 3\)"),
    ("unstacked-layers", 0, lambda t: t[0], r"box_pred: expected shape \(L, B, Q, 4\)"),
    ("dn-meta-query-count", 9, lambda t: t[:, :-2], r"dn_query_to_gt: expected shape \(B=2, D=12\)"),
    ("dn-meta-object-index", 9, lambda t: t + 4, r"dn_query_to_gt: expected values in \[-1, 2\]"),
]


@pytest.mark.parametrize("family", RT_DETR_FAMILIES)
@pytest.mark.parametrize("name, index, change, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(family, name, index, change, match):
    with pytest.raises(ValueError, match=match):
        _call(family, index, change)()


# ---------------------------------------------------------------------------- host reads
def _host_reads(step) -> tuple[int, dict]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from dispatch_count import count_dispatch  # the benchmarks' operator counter

    step()  # once first: what is built once is not per step
    counts = count_dispatch(step)
    return counts.syncs, dict(counts.sync_ops)


@pytest.mark.parametrize("family", RT_DETR_FAMILIES)
@pytest.mark.parametrize("num_gt", [3, 0])
def test_native_reads_the_host_at_most_once_per_step(family, num_gt):
    """Ground-truth checks in one read (the solve's copy is its documented round trip)."""
    import detloss

    case = make_case(family, num_gt=num_gt)
    with detloss.execution_strategy("dense"):
        reads, ops = _host_reads(lambda: loss_and_grads(case.leaves()))
    assert reads <= 1, ops


@pytest.mark.parametrize("name", ["rt_detr_mixed", "d_fine_dense", "deimv2_mixed", "rf_detr_mixed", "detr_mixed"])
def test_transformers_drop_in_reads_the_host_at_most_once_per_step(name):
    """The drop-in's own checks (denoising indices, per-image boxes) join the loss's one read."""
    import detloss
    from test_compat_transformers import call_case, load_case

    case = load_case(name)

    def step():
        loss, _, _ = call_case(case)
        loss.backward()

    with detloss.execution_strategy("dense"):
        reads, ops = _host_reads(step)
    assert reads <= 1, ops
