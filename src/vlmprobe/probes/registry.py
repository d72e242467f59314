"""The probes, each one registered object (`Probe`): its name, headline metric, controls, the
metrics it reports and the plan's quantity each measures, and how to run it. `PROBES` is what
the probe stage runs and what validity, the spatial report, `select`, the CSV and the figures
read.

Results nest by probe, the same for every probe:

- `points.<point>.<probe>.<metric>` and `controls.<control>.<probe>.<metric>` in
  metrics/probe.json; a metric's bootstrap interval is `<metric>_ci95`;
- a trained probe's checkpoint criterion on val is `val_<criterion>` and its chosen step
  `selected_step` (the closed-form probes: `val_<criterion>` and `selected`, the penalties);
- with `probe.seeds` > 1, the headline's values per seed `<headline>_seeds` and their range
  `<headline>_seed_range`;
- a probe that failed on a set of tokens (non-finite output) writes only `invalid`: the reason.

This module imports no torch: the report, `select` and `compare` read it without training
anything; each `run` imports its probe when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from vlmprobe.data.dataset import Split
    from vlmprobe.extract.geometry import TokenGeometry
    from vlmprobe.extract.tokens import Tokens
    from vlmprobe.metrics.image import Lpips


@dataclass(frozen=True)
class TokenSet:
    """One set of single-image tokens (a point's or a control's) and what a probe reads beside
    them: the splits, each token's readout targets, the token grid, the LPIPS network."""

    name: str
    features: dict[str, Tokens]  # split -> (N, T, D), read a batch of images at a time
    targets: dict[str, np.ndarray]  # split -> (N, T, C + 4) `coverage.instance_targets`
    splits: dict[str, Split]
    geometry: TokenGeometry
    lpips: Callable[[], Lpips]  # built once, when a probe first needs it


@dataclass
class ProbeResult:
    metrics: dict[str, Any]  # the probe's record (module docstring)
    detections: list | None = None  # test detections, for the figures (detection probes)
    reconstructions: np.ndarray | None = None  # the first test reconstructions (decoder)


@dataclass(frozen=True)
class Probe:
    name: str
    headline: str  # the metric its validity and its seeds are judged on
    positive: str  # the positive control (must reach the band)
    negative: str  # the negative control (must stay clearly below)
    diagnostics: tuple[str, ...]  # other controls it runs on, reported but not judged
    higher_is_better: bool  # of the headline
    columns: dict[str, str]  # metric -> label, in the report's and the CSV's order
    quantities: dict[str, str]  # metric -> the plan's quantity it measures (bands, select)
    capacity: str  # what the probe is, in one line (the report)
    budget: tuple[str, ...]  # the params that give it more capacity or training
    trained: bool  # has a fit loop: settings.fit, curves, seeds
    clips: bool  # reads clip features (the temporal store), not single images
    # "module:function" taking (TokenSet, settings, curves_dir) and returning a ProbeResult,
    # imported when run (a name, so that readers of the registry import no probe); None for
    # the clip probes, which run over the clip store at once (vlmprobe.probes.temporal).
    runner: str | None

    @property
    def controls(self) -> tuple[str, ...]:
        return (self.positive, self.negative, *self.diagnostics)

    def run(self, tokens: TokenSet, settings: Any, curves_dir: Path) -> ProbeResult:
        if self.runner is None:
            raise TypeError(f"the {self.name} probe reads clips; it has no per-token-set run")
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(tokens, settings, curves_dir)


# Judged on the oracle (ground truth as tokens) and its shuffle; the model's own tokens
# shuffled and raw pixels are diagnostics.
ORACLE_CONTROLS = {"positive": "oracle", "negative": "oracle_shuffled",
                   "diagnostics": ("shuffled", "pixels"), "higher_is_better": True}
# Registry order is run order (bbox first: it is the quickest and always runs).
PROBES: dict[str, Probe] = {p.name: p for p in (
    Probe("bbox", "iou", **ORACLE_CONTROLS,
          columns={"iou": "bbox IoU", "map50": "mAP@0.5 (bbox)"},
          quantities={"iou": "bbox_iou"},
          capacity="per-token ridge map to class coverage and the covering instance's box "
                   "edges, decoded with NMS (closed form)",
          budget=("probe.ridge_alphas", "probe.thresholds"),
          trained=False, clips=False, runner="vlmprobe.probes.coverage:run"),
    Probe("dense", "map50", **ORACLE_CONTROLS,
          columns={"map50": "mAP@0.5 (dense)"},
          quantities={"map50": "map50"},
          capacity="conv head on the token grid (per-token class, centre-ness, box), NMS "
                   "(see vlmprobe.probes.dense)",
          budget=("probe.dense.steps", "probe.dense.width", "probe.dense.depth"),
          trained=True, clips=False, runner="vlmprobe.probes.dense:run"),
    Probe("detr", "map50", **ORACLE_CONTROLS,
          columns={"map50": "mAP@0.5 (DETR)", "map": "mAP (DETR)"},
          quantities={"map50": "map50"},
          capacity="DETR-style: MLP token projection, learned queries with grid reference "
                   "boxes, 2-D sine positions, Hungarian loss (see vlmprobe.probes.detr)",
          budget=("probe.detr.steps", "probe.detr.width", "probe.detr.layers"),
          trained=True, clips=False, runner="vlmprobe.probes.detr:run"),
    Probe("reconstruction", "spatial_iou", positive="pixels", negative="shuffled",
          diagnostics=("oracle", "oracle_shuffled"), higher_is_better=True,
          columns={"lpips": "LPIPS", "ssim": "SSIM", "edge_f1": "edge F1",
                   "spatial_iou": "spatial IoU"},
          quantities={"lpips": "lpips", "ssim": "ssim", "edge_f1": "edge_f1",
                      "spatial_iou": "spatial_iou"},
          capacity="conv decoder on the token grid to the image's pixels "
                   "(see vlmprobe.probes.reconstruction)",
          budget=("probe.reconstruction.steps", "probe.reconstruction.width",
                  "probe.reconstruction.depth"),
          trained=True, clips=False, runner="vlmprobe.probes.reconstruction:run"),
    Probe("temporal", "direction_acc", **ORACLE_CONTROLS,
          columns={"direction_acc": "direction acc."},
          quantities={"direction_acc": "direction_acc"},
          capacity="logistic regression on frame-token spatial moments "
                   "(see vlmprobe.probes.temporal)",
          budget=("probe.temporal.ridge_alphas", "probe.temporal.penalties"),
          trained=False, clips=True, runner=None),
)}
TRAINED = tuple(name for name, p in PROBES.items() if p.trained)
CONTROLS = ("oracle", "oracle_shuffled", "shuffled", "pixels")


def metric_of(record: dict[str, Any], probe: str, metric: str) -> Any:
    """`record[probe][metric]` (a point's or a control's record), None where absent."""
    found = record.get(probe)
    return found.get(metric) if isinstance(found, dict) else None


def measuring(quantity: str) -> list[tuple[str, str]]:
    """(probe, metric) pairs that measure one of the plan's quantities, in registry order."""
    return [(p.name, metric) for p in PROBES.values()
            for metric, q in p.quantities.items() if q == quantity]


def column_name(probe: str, metric: str) -> str:
    """The flat name of a probe's metric where a table needs one (the CSV, dvc plots):
    `<probe>_<metric>` (no dots: Vega-Lite reads a dot as a nested field)."""
    return f"{probe}_{metric}"
