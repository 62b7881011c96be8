"""The rule for values: ground truth and priors are checked with at most one host read per
step, predictions never (DESIGN: "bad data raises; a diverging model gives NaN").

Counted over one forward + backward with the default settings (value checks on) under the
sync-free strategy, by ``benchmarks/dispatch_count.py``: operators whose result the host waits
for (``aten._local_scalar_dense``, ``nonzero``, boolean-mask indexing and the like). Every native
loss of :mod:`tests.reliability.cases` and every drop-in with tensor inputs takes at most one.
DETR's Hungarian solve is a device-to-host copy, not one of these reads: its one documented
round trip.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import detloss
from conftest import golden_cases
from .cases import FAMILIES, RT_DETR_FAMILIES, YOLO_TASK_FAMILIES, loss_and_grads, make_case

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from dispatch_count import _in_library, count_dispatch  # noqa: E402  (the benchmarks' operator counter)

MAX_READS = 1
EVERY_FAMILY = FAMILIES + RT_DETR_FAMILIES + YOLO_TASK_FAMILIES


@pytest.fixture
def dense_with_default_checks():
    previous = detloss.value_checks_enabled()
    detloss.set_value_checks(True)
    try:
        with detloss.execution_strategy("dense"):
            yield
    finally:
        detloss.set_value_checks(previous)


def host_reads(step: Callable[[], object]) -> tuple[int, dict]:
    step()  # once first: what a loss builds once and keeps is not per step
    counts = count_dispatch(step)
    assert counts.ops > 0
    return counts.syncs, dict(counts.sync_ops)


@pytest.mark.usefixtures("dense_with_default_checks")
@pytest.mark.parametrize("family", EVERY_FAMILY)
@pytest.mark.parametrize("num_gt", [3, 0])
def test_native_loss_reads_the_host_at_most_once_per_step(family, num_gt):
    case = make_case(family, num_gt=num_gt)
    reads, ops = host_reads(lambda: loss_and_grads(case))
    assert reads <= MAX_READS, ops


def _backward(*losses: torch.Tensor) -> None:
    sum(l.sum() for l in losses).backward()


def _ssd_pytorch(golden):
    from test_compat_ssd_pytorch import _criterion, _inputs

    g = golden(f"torch/{golden_cases('torch/ssd300_*.npz')[0]}.npz")
    criterion, (loc, conf, priors, targets) = _criterion(g), _inputs(g)
    return lambda: _backward(*criterion((loc, conf, priors), targets))


def _retinaface(golden):
    from test_compat_retinaface import _criterion, _inputs

    g = golden(f"torch/{golden_cases('torch/retina_mnet_*.npz')[0]}.npz")
    criterion, (preds, priors, targets) = _criterion(g), _inputs(g)
    return lambda: _backward(*criterion(preds, priors, targets))


def _ssd_keras(golden):
    from detloss.compat.ssd_keras import SSDLoss

    data = golden("tf/ssd_typical.npz")
    y_true, y_pred = torch.tensor(data["in_y_true"]), torch.tensor(data["in_y_pred"], requires_grad=True)
    loss = SSDLoss(int(data["cfg_neg_pos_ratio"]), int(data["cfg_n_neg_min"]), float(data["cfg_alpha"]))
    return lambda: _backward(loss.compute_loss(y_true, y_pred))


def _tensorflow_yolov3(golden):
    from test_compat_tensorflow_yolov3 import SCALES, make, tensors

    d = golden(f"tf/{golden_cases('tf/yolo_*_c*.npz')[0]}.npz")
    loss = make(d)
    convs = [t.requires_grad_() for t in tensors(d, "in_conv")]
    labels, trues = tensors(d, "mid_label"), tensors(d, "mid_true")
    assert len(convs) == len(SCALES)
    return lambda: _backward(*loss.compute_loss(*convs, *labels, *trues))


def _detr(golden):
    from test_compat_detr import build

    criterion, outputs, targets, _, weight_dict = build(golden(f"detr/{golden_cases('detr/detr_*.npz')[0]}.npz"))
    return lambda: _backward(*(v * weight_dict[k] for k, v in criterion(outputs, targets).items() if k in weight_dict))


def _ultralytics_v8(golden):
    from test_compat_ultralytics import golden_call

    criterion, preds, batch = golden_call(golden(f"ultralytics/{golden_cases('ultralytics/v8_*.npz')[0]}.npz"))
    return lambda: _backward(criterion(preds, batch)[0])


def _ultralytics_obb(golden):
    from test_compat_ultralytics_obb import f32, fake_model, feats_of, golden_batch

    from detloss.compat.ultralytics import v8OBBLoss

    g = golden(f"ultralytics/{golden_cases('ultralytics/obb_*.npz')[0]}.npz")
    model = fake_model(int(g["cfg_nc"]), int(g["cfg_reg_max"]), tuple(g["cfg_strides"].tolist()),
                       tuple(f32(v) for v in g["cfg_gains"]))
    criterion = v8OBBLoss(model, int(g["cfg_tal_topk"]), int(g["cfg_tal_topk2"]) or None)
    preds = {k: torch.from_numpy(g[f"in_{k}"]).requires_grad_() for k in ("boxes", "scores", "angle")}
    preds["feats"] = feats_of(g, preds["boxes"].shape[0])
    return lambda: _backward(criterion(preds, golden_batch(g))[0])


def _ultralytics_e2e(golden):
    from test_compat_ultralytics_obb import e2e_call

    criterion, branches, batch = e2e_call(golden(f"ultralytics/{golden_cases('ultralytics/e2e_*.npz')[0]}.npz"))
    return lambda: _backward(criterion(branches, batch)[0])


def _transformers(name: str):
    def build(golden):
        from test_compat_transformers import call_case, load_case

        case = load_case(name)
        return lambda: _backward(call_case(case)[0])

    return build


DROP_INS = {
    "ultralytics.v8DetectionLoss": _ultralytics_v8,
    "ultralytics.v8OBBLoss": _ultralytics_obb,
    "ultralytics.E2ELoss": _ultralytics_e2e,
    **{f"transformers:{name}": _transformers(name) for name in golden_cases("transformers/*_dense.pt")},
    "ssd_pytorch.MultiBoxLoss": _ssd_pytorch,
    "retinaface.MultiBoxLoss": _retinaface,
    "ssd_keras.SSDLoss": _ssd_keras,
    "tensorflow_yolov3.YOLOv3Loss": _tensorflow_yolov3,
    "detr.SetCriterion": _detr,
}


@pytest.mark.usefixtures("dense_with_default_checks")
@pytest.mark.parametrize("name", sorted(DROP_INS))
def test_drop_in_reads_the_host_at_most_once_per_step(golden, name):
    reads, ops = host_reads(DROP_INS[name](golden))
    assert reads <= MAX_READS, ops


def test_library_frames_are_recognised_by_the_package_folder_not_a_substring(tmp_path):
    clone = tmp_path / "detloss" / "benchmarks" / "bench_x.py"  # what `git clone` makes
    assert not _in_library(str(clone))
    assert _in_library(detloss.boxes.__file__)


@pytest.mark.usefixtures("dense_with_default_checks")
@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_native_loss_checks_each_value_once_per_forward(family, monkeypatch):
    from detloss._validate import ValueChecks

    checked: list[tuple[str, str]] = []
    run = ValueChecks.run

    def counting_run(self, also=None):
        checked.extend(self.checked)
        return run(self, also)

    case = make_case(family, num_gt=3)
    monkeypatch.setattr(ValueChecks, "run", counting_run)
    case.call()
    assert checked, "no value check ran"
    assert len(checked) == len(set(checked)), checked
    assert any(kind == "finite" and name.startswith(("gt_boxes", "proposal")) or name.startswith("proposal_targets")
               for name, kind in checked), checked
