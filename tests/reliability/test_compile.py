"""``torch.compile(fullgraph=True)`` of every native composite loss forward (the real-time DETR,
oriented-box and YOLO26 families included).

``fullgraph=True`` turns any graph break (``.item()``, data-dependent Python branching,
boolean-mask indexing) into an error, so compiling at all proves the forward has none. The
default suite uses the ``aot_eager`` backend (traces forward and backward through AOTAutograd,
fast on a CPU); the inductor version is marked slow. Value checks of ``detloss._validate``
switch themselves off while compiling. Compiled losses and gradients equal eager.

Dynamo cannot take a ``torch.Generator`` argument (a PyTorch limitation), so the RPN sampling
runs on the global RNG here (``generator=None``), re-seeded before the eager and the compiled
call.
"""
from __future__ import annotations

import pytest
import torch

from .cases import FAMILIES, RT_DETR_FAMILIES, YOLO_TASK_FAMILIES, loss_and_grads, make_case, scalar_items

pytestmark = pytest.mark.usefixtures("single_thread")
# the newer families, one of each kind in the default suite (a compile takes tens of seconds)
FAST_NEW = ("rt_detr", "yolo_obb")
NEW_FAMILIES = [f if f in FAST_NEW else pytest.param(f, marks=pytest.mark.slow) for f in RT_DETR_FAMILIES + YOLO_TASK_FAMILIES]


def _compiled_equals_eager(family: str, backend: str, **kw) -> None:
    torch._dynamo.reset()
    case = make_case(family, seed=51, **kw)
    case.generator_seed = None
    torch.manual_seed(0)
    ref, ref_grads = loss_and_grads(case.leaves())
    compiled = torch.compile(case.module, backend=backend, fullgraph=True)
    leaves = case.leaves()
    torch.manual_seed(0)
    out = leaves.call(module=compiled)
    grads = torch.autograd.grad(out["loss"], leaves.pred_tensors(), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves.pred_tensors(), grads)]
    for k, v in scalar_items(ref).items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_aot_eager_equals_eager(family):
    _compiled_equals_eager(family, "aot_eager")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_fullgraph_aot_eager_equals_eager_newer_families(family):
    _compiled_equals_eager(family, "aot_eager", num_gt=[3, 0])


@pytest.mark.parametrize("family", ["ssd", "retinanet", "rpn"])
def test_fullgraph_empty_images(family):
    _compiled_equals_eager(family, "aot_eager", num_gt=[0, 2])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_inductor_equals_eager(family):
    # inductor lowers torch.rand to its own generator: sample every anchor so no draw matters
    _compiled_equals_eager(family, "inductor", sample_all=True)
