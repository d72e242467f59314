"""The align and reconstruct stages refuse bad params in seconds, before loading anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmprobe.params import ParamsError, load_params
from vlmprobe.stages import align, reconstruct
from vlmprobe.vae.registry import VaeError

ROOT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def params(module, **overrides):
    loaded = load_params(module.PARAMS, ROOT_PARAMS)
    for key, value in overrides.items():
        node = loaded
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return loaded


@pytest.mark.parametrize("module", [align, reconstruct])
def test_default_params_are_valid(module):
    module.validate(params(module))


@pytest.mark.parametrize("module", [align, reconstruct])
def test_unknown_target_names_the_choices(module):
    with pytest.raises(VaeError, match="pixels32"):
        module.validate(params(module, video_vae="ltx_videoo"))


def test_bad_values_name_the_key_and_the_fix():
    with pytest.raises(ParamsError, match=r"align.bands.r2 needs target >= acceptable"):
        align.validate(params(align, **{"align.bands.r2.target": 0.1}))
    with pytest.raises(ParamsError, match=r"reconstruct.adapter = 'conv'.*mlp, spatial"):
        reconstruct.validate(params(reconstruct, **{"reconstruct.adapter": "conv"}))
    with pytest.raises(ParamsError, match=r"reconstruct.controls.*pixels, shuffled"):
        reconstruct.validate(params(reconstruct, **{"reconstruct.controls": ["oracle"]}))


def test_band_verdicts_follow_the_plan():
    band = {"target": 0.5, "acceptable": 0.4, "fail": 0.3}
    assert [align.verdict(v, band) for v in (0.6, 0.45, 0.35, 0.2)] == [
        "target", "acceptable", "marginal", "fail"]
