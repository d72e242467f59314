"""The probe registry: what every reader of metrics/probe.json takes a probe's identity from."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import yaml

from vlmprobe.probes.registry import CONTROLS, PROBES, ProbeResult, measuring
from vlmprobe.report.spatial import plan

ROOT = Path(__file__).resolve().parents[1]


def test_every_probe_is_complete_and_judged_by_a_band_in_params():
    bands = yaml.safe_load((ROOT / "params.yaml").read_text())["probe"]["bands"]
    assert set(bands) == set(PROBES)
    for probe in PROBES.values():
        assert set(probe.controls) == set(CONTROLS)  # each control judged or a diagnostic
        assert probe.headline in probe.columns and probe.quantities
        if probe.runner is None:
            assert probe.clips
            continue
        module, function = probe.runner.split(":")
        run = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(run).parameters) == ["tokens", "settings", "curves_dir"]
        assert inspect.signature(run).return_annotation in {"ProbeResult", ProbeResult}


def test_every_plan_quantity_a_probe_measures_has_its_band_or_is_read_by_select():
    quantities = {q for p in PROBES.values() for q in p.quantities.values()}
    assert {"bbox_iou", "map50", "spatial_iou", "lpips", "direction_acc"} <= quantities
    assert measuring("map50") == [("dense", "map50"), ("detr", "map50")]
    assert set(plan()["go_no_go"]) <= quantities


def test_reading_the_registry_imports_no_probe_and_no_torch():
    code = ("import sys, vlmprobe.probes.registry, vlmprobe.report.spatial, "
            "vlmprobe.select.measure; "
            "print(sorted(m for m in sys.modules if m == 'torch' or "
            "m.startswith('vlmprobe.probes.') and m != 'vlmprobe.probes.registry'))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
