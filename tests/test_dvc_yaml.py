"""dvc.yaml declares exactly the params each stage reads (else DVC skips changes silently)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from vlmprobe.cli import stage_modules

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def declared_params(stage: dict) -> set[str]:
    keys = set()
    for item in stage.get("params", []):
        keys.update(item.keys() if isinstance(item, dict) else [item])
    return keys


def test_every_stage_is_a_thin_entry_point_into_the_package():
    assert set(stage_modules(ROOT / "dvc.yaml")) == set(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_declares_exactly_the_params_it_reads(name):
    module = importlib.import_module(stage_modules(ROOT / "dvc.yaml")[name])
    assert set(module.PARAMS) == declared_params(STAGES[name])


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_its_own_entry_point(name):
    module_path = stage_modules(ROOT / "dvc.yaml")[name].replace(".", "/") + ".py"
    assert f"src/{module_path}" in STAGES[name]["deps"]


# Cached on purpose: data and extraction must restore from a pushed run-cache (see dvc.yaml).
CACHED_METRICS = {"metrics/data.json", "metrics/extract.json"}


def test_metrics_are_git_tracked_so_diffs_need_no_remote():
    for stage in STAGES.values():
        for item in stage.get("metrics", []):
            path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
            assert path.startswith("metrics/")
            assert options.get("cache", True) is (path in CACHED_METRICS), path


def test_dvc_config_turns_analytics_and_update_check_off():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "check_update = false" in config
