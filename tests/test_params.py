"""Params: a stage sees only what it declares; bad values fail naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmprobe.cli import validate
from vlmprobe.params import ParamsError, get, load_params, require_choice, require_int

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_only_declared_keys_are_visible(tmp_path):
    path = write(tmp_path, {"vlm": "x", "probe": {"seed": 1, "bootstrap": 10}})
    params = load_params(("probe.seed",), path)
    assert params == {"probe": {"seed": 1}}
    with pytest.raises(ParamsError, match="declare it"):
        get(params, "vlm")


def test_missing_declared_key_names_it(tmp_path):
    path = write(tmp_path, {"probe": {}})
    with pytest.raises(ParamsError, match="probe.seed"):
        load_params(("probe.seed",), path)


def test_range_and_choice_errors_name_value_choices_and_fix():
    with pytest.raises(ParamsError) as e:
        require_int({"a": {"b": -3}}, "a.b", 0, 10)
    assert "a.b = -3" in str(e.value) and "[0, 10]" in str(e.value) and "Fix" in str(e.value)
    with pytest.raises(ParamsError) as e:
        require_choice({"d": "tpu"}, "d", ["cpu", "cuda"])
    assert "'tpu'" in str(e.value) and "cpu, cuda" in str(e.value)
    with pytest.raises(ParamsError):
        require_int({"a": True}, "a", 0, 10)  # a bool is not an integer here


def test_project_params_are_valid_for_every_stage():
    assert validate(ROOT / "params.yaml", ROOT / "dvc.yaml") == []


def test_validate_reports_every_bad_value(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["vlm"] = "no_such_model"
    params["probe"]["bootstrap"] = 0
    errors = validate(write(tmp_path, params), ROOT / "dvc.yaml")
    joined = "\n".join(errors)
    assert "unknown model 'no_such_model'" in joined and "dinov2_small" in joined
    assert "probe.bootstrap = 0" in joined
