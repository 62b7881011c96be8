"""``detloss.compat.transformers``: parity with every golden case of transformers 5.23.0's detection
losses (total, every loss-dict entry, every gradient; README tolerances) under both execution
strategies, one solve per step, the switch helper and bad input."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from detloss.compat import transformers as T
from detloss.matching import hungarian as H

from conftest import golden_cases, golden_path


CASES = golden_cases("transformers/*.pt")


def load_case(name: str) -> dict:
    return torch.load(golden_path(f"transformers/{name}.pt"), weights_only=True)


def call_case(case: dict, fn=None):
    """Call the drop-in on a golden case; returns ``(loss, loss_dict, leaves by gradient key)``."""
    config = types.SimpleNamespace(**case["config"])
    place = {"<config>": config, "<device>": torch.device("cpu")}
    args = [place.get(a, a) if isinstance(a, str) else a for a in case["args"]]
    kwargs, leaves = dict(case["kwargs"]), {}
    for i, a in enumerate(args):
        if torch.is_tensor(a) and a.is_floating_point():
            args[i] = leaves[f"args.{i}"] = a.detach().clone().requires_grad_()
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.is_floating_point():
            kwargs[k] = leaves[f"kwargs.{k}"] = v.detach().clone().requires_grad_()
    fn = T.LOSS_MAPPING[case["family"]] if fn is None else fn
    loss, loss_dict, _ = fn(*args, **kwargs)
    return loss, loss_dict, leaves


@pytest.mark.parametrize("name", CASES)
def test_golden_parity(name):
    case = load_case(name)
    loss, loss_dict, leaves = call_case(case)
    assert set(loss_dict) == set(case["out_loss_dict"])
    for key, want in case["out_loss_dict"].items():
        torch.testing.assert_close(loss_dict[key].detach().float(), want.float(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{name} {key}: {m}")
    torch.testing.assert_close(loss.detach(), case["out_loss"], rtol=1e-5, atol=1e-6)
    loss.backward()
    assert set(case["out_grad"]) <= set(leaves)
    for key, want in case["out_grad"].items():
        got = leaves[key].grad if leaves[key].grad is not None else torch.zeros_like(want)
        tol = 1e-4 * want.abs().max() + 1e-6
        assert (got - want).abs().max() <= tol, f"{name} gradient {key}: {(got - want).abs().max():.3g} > {tol:.3g}"


def test_every_model_family_has_cases():
    prefixes = {"rt_detr", "rt_detr_v2", "d_fine", "deimv2", "deimv2_per_layer", "rf_detr", "deformable_detr", "detr"}
    for prefix in prefixes:
        assert {f"{prefix}_mixed", f"{prefix}_dense"} <= set(CASES)


@pytest.mark.parametrize("name", ["rt_detr_mixed", "d_fine_dense", "rf_detr_mixed", "deimv2_mixed"])
def test_one_solve_per_step(name, monkeypatch):
    """Every layer, group, image and the encoder output: one host round trip."""
    calls = []
    real = H._solve_all
    monkeypatch.setattr(H, "_solve_all", lambda cost, *a: calls.append(tuple(cost.shape)) or real(cost, *a))
    call_case(load_case(name))
    assert len(calls) == 1


def test_loss_mapping_keys_and_helper():
    detection = {
        "ForObjectDetection", "DeformableDetrForObjectDetection", "ConditionalDetrForObjectDetection",
        "DabDetrForObjectDetection", "RTDetrForObjectDetection", "RTDetrV2ForObjectDetection",
        "DFineForObjectDetection", "Deimv2ForObjectDetection", "LwDetrForObjectDetection", "RfDetrForObjectDetection",
    }
    assert set(T.LOSS_MAPPING) == detection
    for name in CASES:
        assert load_case(name)["family"] in T.LOSS_MAPPING
    RTDetrForObjectDetection = type("RTDetrForObjectDetection", (), {})
    model = RTDetrForObjectDetection()
    assert T.use_detloss(model) is T.RTDetrForObjectDetectionLoss and model.loss_function is T.RTDetrForObjectDetectionLoss
    detr = type("DetrForObjectDetection", (), {"loss_type": "ForObjectDetection"})()
    assert T.use_detloss(detr) is T.ForObjectDetectionLoss
    with pytest.raises(ValueError, match=r"model: expected a model class .* got GroundingDinoForObjectDetection"):
        T.use_detloss(type("GroundingDinoForObjectDetection", (), {})())
    with pytest.raises(NotImplementedError, match="segmentation"):
        T.use_detloss(type("ConditionalDetrForSegmentation", (), {})())
    with pytest.raises(NotImplementedError, match="segmentation"):
        T.ForSegmentationLoss(None, None, None, None, None)


def test_module_never_imports_transformers():
    source = Path(T.__file__).read_text()
    assert "import transformers" not in source and "from transformers" not in source
    assert set(T.__all__) <= set(dir(T))


def test_denoising_meta_must_match_queries():
    case = load_case("rt_detr_mixed")
    meta = dict(case["kwargs"]["denoising_meta_values"])
    bad = dict(case, kwargs=dict(case["kwargs"], denoising_meta_values=dict(meta, dn_num_split=[20, 50])))
    with pytest.raises(ValueError, match=r'dn_num_split"\]: expected .* adding up to the 80 queries'):
        call_case(bad)
    short = [idx[:-1] if idx.numel() else idx for idx in meta["dn_positive_idx"]]
    bad = dict(case, kwargs=dict(case["kwargs"], denoising_meta_values=dict(meta, dn_positive_idx=short)))
    with pytest.raises(ValueError, match=r'dn_positive_idx"\]\[0\]: expected dn_num_group x objects = 2 x 3'):
        call_case(bad)
    outside = [idx + 100 for idx in meta["dn_positive_idx"]]
    bad = dict(case, kwargs=dict(case["kwargs"], denoising_meta_values=dict(meta, dn_positive_idx=outside)))
    with pytest.raises(ValueError, match=r"expected values in \[0, 19\]"):
        call_case(bad)


def test_bad_labels_raise_clear_errors():
    case = load_case("d_fine_mixed")
    labels = [dict(t) for t in case["labels"]]
    labels[0] = dict(labels[0], class_labels=labels[0]["class_labels"] + 50)
    args = list(case["args"])
    args[1] = labels
    with pytest.raises(ValueError, match=r"gt_labels: expected values in \[0, 6\]"):
        call_case(dict(case, args=args))
    labels[0] = dict(case["labels"][0], boxes=case["labels"][0]["boxes"] * 640)
    with pytest.raises(ValueError, match=r"gt_boxes: expected normalised coordinates"):
        call_case(dict(case, args=args))


def test_non_finite_predictions_give_non_finite_loss_not_an_error():
    case = load_case("rt_detr_mixed")
    args = list(case["args"])
    args[0] = args[0].clone()
    args[0][0, 30:40] = float("nan")
    args[6] = args[6].clone()
    args[6][1, 0, 25] = float("inf")
    loss, _, _ = call_case(dict(case, args=args))
    assert not torch.isfinite(loss)


def _clone_leaves(args, kwargs):
    clone = lambda x: x.detach().clone().requires_grad_() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
    return [clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}


def test_real_client_small_models():
    """transformers' own tiny random-weight RT-DETR / D-FINE models (no download), trained a few
    steps with ``use_detloss``: at every step the loss, and its gradient with respect to every
    model output, equal transformers' own loss function on the same outputs. (Two copies trained
    apart are not compared: these random-weight models are so ill-conditioned, gradients ~1e4,
    that rounding differences in the loss grow into different weights after one step.)"""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("scipy")
    pytest.importorskip("PIL")
    from transformers.loss.loss_utils import LOSS_MAPPING as THEIRS

    labels = [{"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
              {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for config_cls, model_cls in ((transformers.RTDetrConfig, transformers.RTDetrForObjectDetection),
                                  (transformers.DFineConfig, transformers.DFineForObjectDetection)):
        config = config_cls(num_labels=5, num_queries=20, decoder_layers=2, encoder_layers=1, num_denoising=6)
        torch.manual_seed(0)
        try:
            model = model_cls(config).train()
        except Exception as error:  # pragma: no cover - a transformers version without these classes
            pytest.skip(f"cannot build {model_cls.__name__}: {error}")
        ours = T.use_detloss(model)
        assert ours is T.LOSS_MAPPING[model_cls.__name__]
        calls = []
        model.loss_function = lambda *a, **k: calls.append((a, k)) or ours(*a, **k)
        optimiser = torch.optim.SGD(model.parameters(), lr=1e-5)
        for _ in range(3):
            calls.clear()
            loss = model(pixel_values=pixels, labels=labels).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            assert len(calls) == 1
            results = []
            for fn in (THEIRS[model_cls.__name__], ours):
                args, kwargs = _clone_leaves(*calls[0])
                total = fn(*args, **kwargs)[0]
                leaves = [x for x in [*args, *kwargs.values()] if torch.is_tensor(x) and x.requires_grad]
                grads = torch.autograd.grad(total, leaves, allow_unused=True)
                results.append((total.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]))
            torch.testing.assert_close(loss.detach(), results[0][0], rtol=1e-5, atol=1e-5)
            for want, got in zip(results[0][1], results[1][1]):
                assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-6
