"""Worker-process decoding keeps the order and the pixels; the data stage's source params."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import stage_args
from vlmprobe.data.loader import parallel_map, read_images
from vlmprobe.errors import stage_main
from vlmprobe.params import ParamsError
from vlmprobe.stages import data as data_stage

ROOT = Path(__file__).resolve().parents[1]


def _square(x: int) -> int:
    return x * x


def test_parallel_map_keeps_input_order():
    items = list(range(50))
    assert parallel_map(_square, items, 2, desc="t") == parallel_map(_square, items, 0, desc="t")
    assert parallel_map(_square, items, 2, desc="t") == [x * x for x in items]


def test_images_decode_the_same_in_workers(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    assert np.array_equal(read_images(paths, 0), read_images(paths, 2))


def _params(**changes: object) -> dict:
    params = {"data": copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text())["data"])}
    for dotted, value in changes.items():
        node = params["data"]
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return params


def test_default_params_choose_the_synthetic_shapes():
    config = data_stage.validate(_params())
    assert config["dataset"] == "shapes" and config["on_bad_sample"] == "fail"
    assert "coco" not in config and "ssv2" not in config


@pytest.mark.parametrize(("changes", "message"), [
    ({"dataset": "imagenet"}, r"data\.dataset = 'imagenet' is not one of: coco, shapes, ssv2"),
    ({"on_bad_sample": "ignore"}, r"data\.on_bad_sample = 'ignore' is not one of: fail, skip"),
    ({"dataset": "coco", "coco.images": ""}, r"data\.coco\.images"),
    ({"dataset": "coco", "coco.image_size": 8}, r"data\.coco\.image_size"),
    ({"dataset": "ssv2", "ssv2.n_frames": 1}, r"data\.ssv2\.n_frames"),
])
def test_bad_source_params_name_the_key(changes, message):
    with pytest.raises(ParamsError, match=message):
        data_stage.validate(_params(**changes))


def test_missing_source_fails_naming_the_param_and_writes_nothing(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(_params(**{"dataset": "coco"})))
    assert stage_main(lambda: data_stage.main(stage_args("data"))) == 1
    assert re.match(r"^error: image directory coco/val2017 not found.*data\.coco\.images",
                    capsys.readouterr().err, re.DOTALL)
    assert not Path("data").exists() and not Path("metrics").exists()
