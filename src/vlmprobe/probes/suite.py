"""The spatial probe protocol for one model: which probe runs on which tokens, and the merged
metrics (per point, per control) with each probe's validity."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import Tokens
from vlmprobe.metrics.image import Lpips
from vlmprobe.probes.coverage import ProbeSettings
from vlmprobe.probes.dense import DenseSettings
from vlmprobe.probes.detection import Detections
from vlmprobe.probes.detr import DetrSettings
from vlmprobe.probes.reconstruction import ReconstructionSettings
from vlmprobe.probes.registry import PROBES, TokenSet
from vlmprobe.probes.validity import Band, probe_validity


@dataclass(frozen=True)
class SuiteSettings:
    bbox: ProbeSettings
    dense: DenseSettings
    detr: DetrSettings
    reconstruction: ReconstructionSettings
    bands: dict[str, Band]
    lpips_net: str


@dataclass
class Artifacts:
    """What the figures need from one set of tokens: test detections and reconstructions."""

    detections: dict[str, list[Detections]] = field(default_factory=dict)
    reconstructions: np.ndarray | None = None


@dataclass
class Suite:
    splits: dict[str, Split]
    settings: SuiteSettings
    assets_dir: Path  # the LPIPS weights (the assets stage's)
    curves_dir: Path  # dvclive curves: <probe>/<point or control>/
    timings: dict[str, float] = field(default_factory=dict)
    _lpips: Lpips | None = None

    def lpips(self) -> Lpips:
        if self._lpips is None:
            self._lpips = Lpips(self.settings.lpips_net, self.assets_dir)
        return self._lpips

    def _timed(self, key: str, fn: Callable, *args):
        cuda = self.settings.dense.fit.device.type == "cuda"  # one probe.device for all
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn(*args)
        self.timings[key] = time.perf_counter() - start
        peak = (f" (peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)"
                if cuda else "")
        print(f"probe: {key} {self.timings[key]:.1f} s{peak}", flush=True)
        return result

    def run(
        self, name: str, features: dict[str, Tokens], targets: dict[str, np.ndarray],
        geometry: TokenGeometry, probes: set[str], seeds: int = 1,
    ) -> tuple[dict, Artifacts]:
        """Every probe in `probes` (registry order) on one set of tokens (a point or a control)
        named `name`: `{probe: record}` and the figures' artifacts.

        With `seeds` > 1 each trained probe is trained again with seeds seed + 1, ...: its
        headline's values go in its record as `<headline>_seeds` (the first is the reported
        run's) and their range as `<headline>_seed_range`. Training noise is not in the
        bootstrap interval, which resamples test images only.
        """
        tokens = TokenSet(name, features, targets, self.splits, geometry, self.lpips)
        records: dict = {}
        artifacts = Artifacts()
        for probe in (p for p in PROBES.values() if p.name in probes):
            settings = getattr(self.settings, probe.name)
            curves = self.curves_dir / probe.name / name
            result = self._timed(f"{probe.name}/{name}", probe.run, tokens, settings, curves)
            records[probe.name] = result.metrics
            if result.detections is not None:
                artifacts.detections[probe.name] = result.detections
            if result.reconstructions is not None:
                artifacts.reconstructions = result.reconstructions
            if not probe.trained or seeds == 1:
                continue
            values = [result.metrics.get(probe.headline)]
            for extra in range(1, seeds):
                seed = settings.fit.seed + extra
                reseeded = replace(settings, fit=replace(settings.fit, seed=seed))
                again = self._timed(f"{probe.name}/{name}/seed{seed}", probe.run, tokens,
                                    reseeded, self.curves_dir / probe.name / f"{name}-seed{seed}")
                values.append(again.metrics.get(probe.headline))
            if all(isinstance(v, float | int) for v in values):
                result.metrics[f"{probe.headline}_seeds"] = values
                result.metrics[f"{probe.headline}_seed_range"] = max(values) - min(values)
        return records, artifacts

    def validity(self, controls: dict[str, dict], probes_run: set[str]) -> dict:
        """One verdict per probe run, from its records on the controls."""
        return {
            probe: probe_validity(probe, {c: r.get(probe, {}) for c, r in controls.items()},
                                  band)
            for probe, band in self.settings.bands.items()
            if probe in probes_run
        }
