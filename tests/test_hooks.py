"""Hook capture: named outputs, and nothing past the deepest requested module runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmprobe.extract.hooks import capture_outputs


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + 1


def test_captures_requested_outputs_and_stops_after_the_deepest():
    layers = nn.Sequential(*[Counting() for _ in range(4)])
    out = capture_outputs({"a": layers[0], "b": layers[1]}, lambda: layers(torch.zeros(1)))
    assert out["a"].item() == 1 and out["b"].item() == 2
    assert [layer.calls for layer in layers] == [1, 1, 0, 0]


def test_two_names_for_one_module_and_hooks_are_removed():
    layer = Counting()
    out = capture_outputs({"x": layer, "y": layer}, lambda: layer(torch.zeros(1)))
    assert out["x"] is out["y"]
    assert not layer._forward_hooks


def test_a_module_never_reached_is_an_error():
    used, unused = Counting(), Counting()
    with pytest.raises(RuntimeError, match="never reached: b"):
        capture_outputs({"a": used, "b": unused}, lambda: used(torch.zeros(1)))
