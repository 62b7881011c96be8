"""``detloss._constants.device_constant``: the tensor ``torch.tensor`` would build, copied to a
non-CPU device without a blocking (stream-synchronising) copy."""
from __future__ import annotations

import torch

from detloss._constants import device_constant


def test_same_tensor_as_torch_tensor():
    for values, dtype in (([8, 16, 32], torch.float64), ([[52, 52], [26, 26]], torch.int64), (0.5, torch.float32)):
        got = device_constant(values, dtype=dtype, device="cpu")
        assert torch.equal(got, torch.tensor(values, dtype=dtype)) and got.dtype == dtype


def test_tensors_are_converted_like_as_tensor():
    values = torch.tensor([[416.0, 416.0]])
    assert device_constant(values, dtype=torch.float32, device="cpu") is values
    assert device_constant(values, dtype=torch.float64, device="cpu").dtype == torch.float64


def test_other_devices_get_a_non_blocking_copy(monkeypatch):
    calls = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    out = device_constant([1.0, 2.0], dtype=torch.float32, device="meta")
    assert out.device.type == "meta" and out.shape == (2,) and calls == [True]
