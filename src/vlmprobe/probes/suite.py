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
from vlmprobe.probes.coverage import ProbeSettings, run_bbox_probe
from vlmprobe.probes.dense import DenseSettings, run_dense_probe
from vlmprobe.probes.detection import Detections
from vlmprobe.probes.detr import DetrSettings, run_detr_probe
from vlmprobe.probes.reconstruction import ReconstructionSettings, run_reconstruction_probe
from vlmprobe.probes.validity import CONTROLLED, Band, probe_validity

TOKEN_PROBES = ("bbox", "dense", "detr", "reconstruction")  # probes on single-image tokens


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
        cuda = torch.cuda.is_available()
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
        """Every probe in `probes` on one set of tokens (a point or a control) named `name`.

        With `seeds` > 1 each trained probe is trained again with seeds seed + 1, ...: its
        headline metric's values go beside it as `<metric>_seeds` (the first is the reported
        run's) and their range as `<metric>_seed_range`. Training noise is not in the
        bootstrap interval, which resamples test images only.
        """
        s = self.settings
        metrics: dict = {}
        artifacts = Artifacts()
        if "bbox" in probes:
            metrics.update(self._timed(f"bbox/{name}", lambda: run_bbox_probe(
                features, targets, self.splits, geometry, s.bbox)))
        trained = {
            "dense": lambda settings, curves: run_dense_probe(
                features, self.splits, geometry, settings, curves),
            "detr": lambda settings, curves: run_detr_probe(
                features, self.splits, geometry, settings, curves),
            "reconstruction": lambda settings, curves: run_reconstruction_probe(
                features, self.splits, geometry, self.lpips(), settings, curves),
        }
        for probe, train in trained.items():
            if probe not in probes:
                continue
            settings = getattr(s, probe)
            found, artifact = self._timed(f"{probe}/{name}", train, settings,
                                          self.curves_dir / probe / name)
            metrics.update(found)
            if probe == "reconstruction":
                artifacts.reconstructions = artifact
            else:
                artifacts.detections[probe] = artifact
            metric = CONTROLLED[probe][0]
            values = [found.get(metric)]
            for extra in range(1, seeds):
                seed = settings.fit.seed + extra
                reseeded = replace(settings, fit=replace(settings.fit, seed=seed))
                again, _ = self._timed(f"{probe}/{name}/seed{seed}", train, reseeded,
                                       self.curves_dir / probe / f"{name}-seed{seed}")
                values.append(again.get(metric))
            if seeds > 1 and all(isinstance(v, float | int) for v in values):
                metrics[f"{metric}_seeds"] = values
                metrics[f"{metric}_seed_range"] = max(values) - min(values)
        return metrics, artifacts

    def validity(self, controls: dict[str, dict], probes_run: set[str]) -> dict:
        return {
            probe: probe_validity(probe, controls, band)
            for probe, band in self.settings.bands.items()
            if probe in probes_run
        }
