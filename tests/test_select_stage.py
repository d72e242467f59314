"""The `select` stage: one run's decisions in metrics/select.json."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import stage_args
from test_select_measure import probe_metrics
from vlmprobe.errors import MissingInput
from vlmprobe.models.registry import RegistryError
from vlmprobe.stages import select

OUT = ["--out", stage_args("select")[-1]]


def workspace(tmp_path, monkeypatch, vlm="dinov2_small", baseline="qwen2_5_vl"):
    """Probe and extract metrics of `vlm`; params name only the speed baseline, as the model is
    the one the metrics are of."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"select": {"speed_baseline": baseline}}))
    (tmp_path / "metrics").mkdir()
    probe = probe_metrics()
    probe["meta"]["vlm"] = vlm
    (tmp_path / "metrics/probe.json").write_text(json.dumps(probe))
    (tmp_path / "metrics/extract.json").write_text(json.dumps(
        {"vlm": vlm, "device": "cpu", "seconds_per_image": 0.05}))
    return ["metrics/probe.json", "metrics/extract.json", *OUT]


def test_the_stage_runs_as_dvc_yaml_says():
    args = stage_args("select")
    assert args[-2:] == ["--out", "metrics/select.json"]
    assert all(a.startswith("metrics/") for a in args[:-2])


def test_select_json_holds_scores_verdicts_and_outcomes(tmp_path, monkeypatch):
    select.main(workspace(tmp_path, monkeypatch))
    result = json.loads((tmp_path / "metrics/select.json").read_text())
    run = result["runs"]["dinov2_small"]
    assert run["measurements"]["bbox_iou"]["value"] == 0.6
    assert run["measurements"]["speed_ratio"]["value"] is None  # no baseline in a single run
    assert run["measurements"]["integration_complexity"]["level"] == "medium"
    assert run["must_pass"]["spatial_iou"] == "fail"  # best spatial IoU 0.5, no interval
    assert run["selection"]["speed_ratio"] == "not measured"
    assert result["recommendation"]["row"] == "major_pivot"  # no run above 0.50
    assert result["selection"]["row"] == "all_fail_iou"
    assert result["ranking"][0]["run"] == "dinov2_small"


def test_the_baseline_run_is_its_own_speed_reference(tmp_path, monkeypatch):
    select.main(workspace(tmp_path, monkeypatch, vlm="pixels", baseline="pixels"))
    result = json.loads((tmp_path / "metrics/select.json").read_text())
    assert result["runs"]["pixels"]["measurements"]["speed_ratio"]["value"] == 1.0


def test_the_model_is_the_one_the_probe_metrics_are_of_whatever_params_say(tmp_path,
                                                                            monkeypatch):
    args = workspace(tmp_path, monkeypatch)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"vlm": "pixels", "select": {"speed_baseline": "qwen2_5_vl"}}))
    select.main(args)
    assert set(json.loads((tmp_path / "metrics/select.json").read_text())["runs"]) == {
        "dinov2_small"}


def test_without_probe_metrics_naming_a_model_the_stage_says_so(tmp_path, monkeypatch):
    workspace(tmp_path, monkeypatch)
    with pytest.raises(MissingInput, match="no metrics/probe.json among metrics/extract.json"):
        select.main(["metrics/extract.json", *OUT])
    probe = json.loads((tmp_path / "metrics/probe.json").read_text())
    del probe["meta"]["vlm"]
    (tmp_path / "metrics/probe.json").write_text(json.dumps(probe))
    with pytest.raises(MissingInput, match="metrics/probe.json names no model"):
        select.main(["metrics/probe.json", *OUT])


def test_probe_metrics_of_an_unregistered_model_name_the_registered_ones(tmp_path, monkeypatch):
    args = workspace(tmp_path, monkeypatch, vlm="qwen9")
    with pytest.raises(RegistryError, match="unknown model 'qwen9'.*Registered models"):
        select.main(args)


def test_unknown_speed_baseline_names_the_registered_models():
    with pytest.raises(RegistryError, match="unknown model 'qwen9'.*Registered models"):
        select.validate({"select": {"speed_baseline": "qwen9"}})
