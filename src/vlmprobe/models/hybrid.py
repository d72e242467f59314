"""Hybrid entries (the plan's section 10.1): a VLM for semantics and time beside a spatial
encoder for layout, meeting on one token grid, as one model for every stage.

An entry names its parts, `parts: {vlm: <entry>, spatial: <entry>}`, the part whose token grid
they meet on (`grid: vlm` or `grid: spatial`), and points that pair one point of each part
(`H2: {vlm: Q2, spatial: final}`). Each batch runs each part once, up to the deepest point it
contributes. At a hybrid point the other part's tokens are resampled onto the grid part's
token boxes by area (`area_weights`), each part is scaled per image so its root-mean-square
token norm is sqrt(D / 2) (D the hybrid's width: the parts carry equal energy, so neither
dominates a kernel or a ridge fit by scale, and elements stay near unit size for the float16
store), and the two are concatenated along width, VLM first. The geometry is the grid part's;
generation (grounding, questions) is the VLM part's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry, area_weights
from vlmprobe.models.base import ModelAdapter
from vlmprobe.models.registry import RegistryEntry, RegistryError, adapter_for, entries

ROLES = ("vlm", "spatial")  # concatenation order


def balanced(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T, d) tokens scaled per image so their RMS token norm is sqrt(width / 2)."""
    tokens = tokens.float()
    rms_norm = tokens.square().sum(-1).mean(-1).sqrt()[:, None, None]
    return tokens * (np.sqrt(width / 2) / rms_norm.clamp_min(torch.finfo(torch.float32).tiny))


def joined(parts: dict[str, torch.Tensor], resampling: dict[str, np.ndarray | None]
           ) -> torch.Tensor:
    """The hybrid's (B, T, D) tokens from each role's (B, T_role, d_role) tokens: resampled onto
    the grid (a (T, T_role) weight matrix, None for the grid part), balanced, concatenated."""
    on_grid = {}
    for role in ROLES:
        x = parts[role].float()
        weights = resampling[role]
        if weights is not None:
            x = torch.einsum("pt,btd->bpd", torch.from_numpy(weights).to(x.device), x)
        on_grid[role] = x
    width = sum(x.shape[-1] for x in on_grid.values())
    return torch.cat([balanced(on_grid[role], width) for role in ROLES], dim=-1)


class HybridAdapter(ModelAdapter):
    """Two registered entries' adapters, run one after the other on the same images."""

    def __init__(self, entry: RegistryEntry):
        super().__init__(entry)
        self.part_entries = part_entries(entry)
        self.parts = {role: adapter_for(e) for role, e in self.part_entries.items()}
        self.on = entry.options.get("grid", "vlm")
        if self.on not in ROLES:
            raise RegistryError(f"{entry.path}: grid {self.on!r} is not one of {', '.join(ROLES)}"
                                " (the part whose token grid the hybrid's tokens lie on)")
        for point, spec in entry.points.items():
            for role in ROLES:
                own = self.part_entries[role].points
                if spec.get(role) not in own:
                    raise RegistryError(
                        f"{entry.path}: point {point!r} takes {role} point {spec.get(role)!r}; "
                        f"{self.part_entries[role].name} has points {', '.join(own)}. Fix: "
                        f"`{point}: {{vlm: <point>, spatial: <point>}}` with points of the parts.")
        vlm = self.parts["vlm"]
        self.generates = vlm.generates
        self.box_format = vlm.box_format
        self.grounding_template = vlm.grounding_template
        self.resampled: dict[tuple, dict[str, np.ndarray | None]] = {}

    def part_points(self, role: str, points: list[str]) -> list[str]:
        """The role's points that `points` need, once each, in the part's depth order."""
        wanted = {self.entry.points[p][role] for p in points}
        return [p for p in self.part_entries[role].points if p in wanted]

    def check_points(self, points: list[str], project_root: Path) -> None:
        for role, part in self.parts.items():
            part.check_points(self.part_points(role, points), project_root)

    def load(self, project_root: Path, device: torch.device) -> nn.Module:
        return nn.ModuleDict({role: part.load(project_root, device)
                              for role, part in self.parts.items()})

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        return {**{role: part.prepare(images, device) for role, part in self.parts.items()},
                "image_size": tuple(images.shape[1:3])}

    def capture(self, model: nn.Module, inputs: dict[str, Any],
                points: list[str]) -> dict[str, torch.Tensor]:
        captured = {role: part.capture(model[role], inputs[role], self.part_points(role, points))
                    for role, part in self.parts.items()}
        return {p: joined({role: captured[role][self.entry.points[p][role]] for role in ROLES},
                          self.resampling(p, inputs["image_size"]))
                for p in points}

    def resampling(self, point: str, image_size: tuple[int, int]) -> dict[str, np.ndarray | None]:
        """Each role's (T, T_role) area weights onto the grid part's tokens (None for the grid
        part), computed once per point and image size."""
        key = (point, image_size)
        if key not in self.resampled:
            grid = self.part_geometry(self.on, point, image_size)
            self.resampled[key] = {
                role: None if role == self.on else
                area_weights(self.part_geometry(role, point, image_size), grid)
                for role in ROLES}
        return self.resampled[key]

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        return self.part_geometry(self.on, point, image_size)

    def part_geometry(self, role: str, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        return self.parts[role].geometry(self.entry.points[point][role], image_size)

    def weights_provenance(self, project_root: Path) -> dict[str, Any]:
        """Both parts' provenance; `source` and the RANDOM `label` summarise them."""
        parts = {role: {"entry": self.part_entries[role].name,
                        "display_name": self.part_entries[role].display_name,
                        "weights": part.weights_provenance(project_root)}
                 for role, part in self.parts.items()}
        record = {"source": "hybrid (" + ", ".join(
            f"{role} {p['entry']}: {p['weights'].get('source')}" for role, p in parts.items())
            + ")", "parts": parts, "grid": self.on}
        labels = [f"{role} part: {p['weights']['label']}" for role, p in parts.items()
                  if "label" in p["weights"]]
        if labels:
            record["label"] = "; ".join(labels)
        return record

    def code_and_weights_identity(self, project_root: Path,
                                  hash_cache: Path | None = None) -> dict[str, Any]:
        return {"hybrid": super().code_and_weights_identity(project_root, hash_cache),
                **{role: part.code_and_weights_identity(project_root, hash_cache)
                   for role, part in self.parts.items()}}

    def generate(self, model: nn.Module, images: np.ndarray, prompts: list[str],
                 max_new_tokens: int, device: torch.device) -> list[str]:
        return self.parts["vlm"].generate(model["vlm"], images, prompts, max_new_tokens, device)

    def parse_grounding(self, answer: str, image_size: tuple[int, int]) -> np.ndarray | None:
        return self.parts["vlm"].parse_grounding(answer, image_size)


def part_entries(entry: RegistryEntry) -> dict[str, RegistryEntry]:
    """The registry entries `entry.parts` names, by role, or a RegistryError naming the fix."""
    parts = entry.options.get("parts")
    if not isinstance(parts, dict) or sorted(parts) != sorted(ROLES):
        raise RegistryError(f"{entry.path}: a hybrid entry needs `parts: {{vlm: <entry>, "
                            f"spatial: <entry>}}`, got {parts!r}")
    known = entries()
    found = {}
    for role in ROLES:
        name = str(parts[role])
        if name not in known:
            raise RegistryError(f"{entry.path}: parts.{role} = {name!r} is not a registered "
                                f"model. Registered: {', '.join(sorted(known))}.")
        if known[name].family == "hybrid":
            raise RegistryError(f"{entry.path}: parts.{role} = {name!r} is a hybrid: a hybrid's "
                                "parts are plain entries (a VLM and a spatial encoder).")
        found[role] = known[name]
    return found
