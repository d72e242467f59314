"""The image detector behind `map50` from reconstructions: its params are checked up front.
(Training and scoring run end to end in tests/test_extract_pipeline.py, on the real DINOv2
weights the `assets` stage builds.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmprobe.params import ParamsError, load_params
from vlmprobe.stages import reconstruct

ROOT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def with_detector(**values):
    params = load_params(reconstruct.PARAMS, ROOT_PARAMS)
    params["reconstruct"]["detector"].update(values)
    return params


def test_detector_settings_follow_the_stage_seed_and_bootstrap():
    config = reconstruct.validate(load_params(reconstruct.PARAMS, ROOT_PARAMS))
    dense = config["detector"].dense
    assert dense.fit.seed == config["train"].seed
    assert dense.bootstrap == config["scores"].bootstrap


@pytest.mark.parametrize(("key", "value"), [("eval_every", 10_000), ("train_samples", 2),
                                            ("width", 0), ("lr", 5.0),
                                            ("threads", 0)])
def test_bad_detector_values_name_the_key(key, value):
    with pytest.raises(ParamsError, match=rf"reconstruct\.detector\.{key} = {value}"):
        reconstruct.validate(with_detector(**{key: value}))
