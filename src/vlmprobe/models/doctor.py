"""`vlmprobe doctor`: a checkpoint's own code and config, shrunk, run through a real load.

Before GPU hours go into a checkpoint, this builds a tiny random model from *that checkpoint's*
code and config (sizes shrunk, everything else as published), saves it as a checkpoint
(safetensors), loads it back through the path a real run takes (`from_pretrained` through the
family's adapter, so load-time bugs show), and checks every extraction point and one
generation on two images, on the CPU:

- finite: no NaN or inf in the point's tokens;
- buffers: every non-persistent buffer (not in the checkpoint, so rebuilt at load) equals a
  freshly constructed model's (uninitialised rotary caches were InternVL2's silent bug);
- full pass: early exit (the extractor stops after the deepest point) gives the same tokens
  as a complete forward pass;
- reference: for LLM layers, the tokens equal `output_hidden_states` of a correctly
  initialised model with the same weights, at the image-token positions (the last layer is
  not compared: `hidden_states` holds it after the final norm);
- tokens: the model's image-token count equals the point's geometry (the engine's own check).

The conformance tests run the published InternVL2 and CogVLM2 code through the same functions.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmprobe.errors import VlmprobeError
from vlmprobe.extract.engine import extract_points
from vlmprobe.models.base import code_revision
from vlmprobe.models.registry import RegistryEntry, adapter_for
from vlmprobe.models.vlm import VLMAdapter, deep_update, gather_positions

# Files a checkpoint folder carries besides weights: code, config, tokenizer and processor.
PREPROCESSING_FILES = ("tokenizer*", "*.model", "*.tiktoken", "vocab.*", "merges.txt",
                       "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                       "processor_config.json", "chat_template.*", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU = torch.device("cpu")
MAX_PARAMETERS = 50_000_000  # a shrunk model beyond this is not shrunk: the doctor refuses it
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class CannotShrink(VlmprobeError, ValueError):
    """The family has no `tiny_config` and the checkpoint is too large for a CPU preflight."""


@dataclass
class PointCheck:
    point: str
    kind: str
    tokens: int = 0
    grids: str = ""
    finite: bool | None = None
    equals_full_pass: bool | None = None
    equals_reference: bool | None = None  # None: not comparable (not an LLM layer, or the last)
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass
class DoctorReport:
    entry: str
    checkpoint: str
    dtype: str
    device: str = "cpu"
    points: list[PointCheck] = field(default_factory=list)
    buffers_problem: str = ""
    generation: list[str] | None = None
    generation_problem: str = ""
    mends: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_problem: str = ""

    @property
    def ok(self) -> bool:
        return not (self.load_problem or self.buffers_problem or self.generation_problem
                    or any(not p.ok for p in self.points))


def preprocessing_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in PREPROCESSING_FILES for p in folder.glob(pattern)})


def shrunk_points(entry: RegistryEntry, real: dict[str, int], tiny: dict[str, int]
                  ) -> dict[str, dict[str, Any]]:
    """The entry's points on the shrunk model: a layer keeps its relative depth."""
    points = {}
    for point, spec in entry.points.items():
        spec = dict(spec)
        layer = spec.get("layer")
        if isinstance(layer, int) and layer != -1:
            stack = "llm" if spec.get("kind") == "llm" else "vision"
            spec["layer"] = max(1, min(tiny[stack], round(layer * tiny[stack] / real[stack])))
        points[point] = spec
    return points


def local_entry(template: RegistryEntry, checkpoint: Path, points: dict[str, dict[str, Any]]
                ) -> RegistryEntry:
    """`template`'s family and points, loading `checkpoint` as a `source: local` entry does."""
    weights: dict[str, Any] = {"source": "local", "path": str(checkpoint)}
    if adapter_for(template).remote_code:
        weights.update(trust_remote_code=True, revision=code_revision(checkpoint))
    return RegistryEntry(name=f"{template.name}-doctor", family=template.family,
                         display_name=f"{template.display_name} (doctor: shrunk, random)",
                         points=points, weights=weights, options=dict(template.options),
                         path=checkpoint / "config.json")


def build_tiny_checkpoint(template: RegistryEntry, source: Path, out: Path, seed: int = 0
                          ) -> RegistryEntry:
    """Save a shrunk random model of `source`'s code and config in `out`; its local entry.

    `source` is a checkpoint folder (weights are not read) or a folder of model code with a
    config.json. Tokenizer and processor files are copied; where there are none, the family's
    offline tokenizer/processor (as the random entries build) is saved in their place.
    """
    adapter = adapter_for(template)
    if not isinstance(adapter, VLMAdapter):
        raise ValueError(f"vlmprobe doctor checks VLM families; {template.name!r} is "
                         f"{template.family!r}")
    out.mkdir(parents=True, exist_ok=True)
    for path in [*source.glob("*.py"), *preprocessing_files(source)]:
        shutil.copy2(path, out / path.name)
    from transformers import AutoConfig, AutoTokenizer

    remote = {"trust_remote_code": True} if adapter.remote_code else {}
    config_dict = deep_update(json.loads((source / "config.json").read_text()),
                              adapter.tiny_config)
    if preprocessing_files(source) and adapter.vocab_size_key:
        # A random model samples every id its vocabulary has; a slow (sentencepiece)
        # tokenizer cannot decode ids past its own length.
        *parents, key = adapter.vocab_size_key
        section = config_dict
        for parent in parents:
            section = section[parent]
        section[key] = min(section[key], len(AutoTokenizer.from_pretrained(str(out), **remote)))
    (out / "config.json").write_text(json.dumps(config_dict, indent=1))
    real = adapter.layer_counts(AutoConfig.from_pretrained(str(source), **remote))
    config = AutoConfig.from_pretrained(str(out), **remote)
    def build() -> nn.Module:
        if adapter.remote_code:
            return adapter.published_class(config, str(out), {})(config)
        return adapter.model_class()._from_config(config)

    if not adapter.tiny_config:  # as published: its size first, without allocating it
        with torch.device("meta"):
            parameters = sum(p.numel() for p in build().parameters())
    if not adapter.tiny_config and parameters > MAX_PARAMETERS:
        raise CannotShrink(
            f"the {template.family} family has no `tiny_config` to shrink {source}/config.json "
            f"with, and as published it has {parameters / 1e6:.0f}M parameters: too many for a "
            f"CPU preflight. Fix: run `vlmprobe doctor {template.family}_tiny` (the family's "
            f"class from a shrunk config), or add a `tiny_config` to its adapter."
        )
    torch.manual_seed(seed)
    model = build()
    save_weights(model.eval(), out)
    if not preprocessing_files(source):
        adapter.dtype = torch.float32
        adapter.mends = []
        adapter.setup(model, None)
        adapter.save_preprocessing(out)
    tiny = adapter.layer_counts(config)
    return local_entry(template, out, shrunk_points(template, real, tiny))


def save_weights(model: nn.Module, folder: Path) -> None:
    """model.safetensors as a checkpoint holds it: every persistent tensor, shared ones once."""
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def reference_model(adapter: VLMAdapter, checkpoint: Path, loaded: nn.Module,
                    dtype: torch.dtype) -> nn.Module:
    """The checkpoint's architecture built by its constructor (buffers initialised as the code
    intends), holding the checkpoint's weights."""
    from safetensors.torch import load_file

    config = loaded.config
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`, as from_pretrained(dtype=...) builds
    try:
        if adapter.remote_code:
            model = adapter.published_class(config, str(checkpoint), {})(config)
        else:
            model = adapter.model_class()._from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    for name in ("img_context_token_id",):  # set by the chat API before any forward
        if hasattr(loaded, name):
            setattr(model, name, getattr(loaded, name))
    return model.eval()


def buffer_problem(loaded: nn.Module, reference: nn.Module, tolerance: float) -> str:
    """Non-persistent buffers of `loaded` that differ from a fresh construction's (within the
    dtype's tolerance: a cache computed on another device rounds differently)."""
    fresh = dict(reference.named_buffers())
    bad = []
    for name, buffer in loaded.named_buffers():
        other = fresh.get(name)
        if other is None or other.shape != buffer.shape:
            continue
        if not torch.allclose(buffer.float(), other.float().to(buffer.device), rtol=tolerance,
                              atol=tolerance):
            bad.append(name)
    if not bad:
        return ""
    return (f"{len(bad)} buffer(s) differ from a freshly built model after loading, e.g. "
            f"{', '.join(bad[:3])}: non-persistent buffers left uninitialised by "
            f"from_pretrained. Fix: recompute them in the family adapter's setup (as "
            f"vlmprobe.models.internvl2.restore_rotary_buffers does for InternLM2).")


def full_pass_tokens(adapter: VLMAdapter, model: nn.Module, inputs: dict[str, Any],
                     points: list[str]) -> dict[str, torch.Tensor]:
    """Every point's tokens from one complete forward pass (no early exit)."""
    outputs: dict[str, Any] = {}
    handles = []
    for point in points:
        def hook(_module: nn.Module, _inputs: Any, output: Any, point: str = point) -> None:
            outputs.setdefault(point, output)

        handles.append(adapter.point_module(model, point).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            adapter.forward(model, inputs)
            return {p: adapter.point_tokens(p, outputs[p], inputs).float().cpu()
                    for p in points}
    finally:
        for handle in handles:
            handle.remove()


def reference_hidden_states(adapter: VLMAdapter, reference: nn.Module,
                            inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        output = reference(**inputs, output_hidden_states=True, return_dict=True)
    return getattr(output, adapter.llm_hidden_states)


def sample_images(n: int = 2, size: tuple[int, int] = (224, 224), seed: int = 0) -> np.ndarray:
    """Smooth random images (real-looking enough for a random model: no flat colours)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
    grid = torch.nn.functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2),
                                           size=size, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8)


def check_checkpoint(entry: RegistryEntry, dtype: torch.dtype, project_root: Path,
                     images: np.ndarray | None = None,
                     device: torch.device = CPU) -> DoctorReport:
    """Load `entry` (a local checkpoint) as a run does and check every point and generation."""
    started = time.perf_counter()
    images = sample_images() if images is None else images
    report = DoctorReport(entry=entry.name, checkpoint=str(entry.weights.get("path")),
                          dtype=str(dtype).removeprefix("torch."), device=str(device))
    adapter = adapter_for(entry)
    points = list(entry.points)
    try:
        adapter.check_points(points, project_root)
        model = adapter.load(project_root, device, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - the doctor reports every failure as a table row
        report.load_problem = f"load failed: {type(e).__name__}: {e}"
        return report
    report.mends = list(adapter.mends)
    checkpoint = Path(entry.weights["path"])
    reference = reference_model(adapter, checkpoint, model, dtype).to(device)
    tolerance = TOLERANCE[dtype]
    report.buffers_problem = buffer_problem(model, reference, tolerance)
    inputs = adapter.prepare(images, device)
    try:
        early = extract_points(adapter, model, images, points, device)
    except Exception as e:  # noqa: BLE001
        report.points = [PointCheck(p, entry.points[p].get("kind", ""),
                                    problem=f"extraction failed: {type(e).__name__}: {e}")
                         for p in points]
        return report
    full = full_pass_tokens(adapter, model, inputs, points)
    hidden = reference_hidden_states(adapter, reference, inputs)
    image_index = adapter.image_token_index(inputs)
    depth = adapter.layer_counts(model.config)["llm"]
    for point in points:
        spec = entry.points[point]
        geometry = adapter.geometry(point, tuple(images.shape[1:3]))
        tokens = early[point]
        check = PointCheck(point, spec.get("kind", ""), tokens=int(tokens.shape[1]),
                           grids=" + ".join(f"{g.rows}x{g.cols}" for g in geometry.grids))
        check.finite = bool(torch.isfinite(tokens).all())
        check.equals_full_pass = bool(torch.allclose(tokens, full[point], atol=tolerance,
                                                     rtol=tolerance))
        layer = spec.get("layer")
        if spec.get("kind") == "llm" and layer not in (-1, depth):
            expected = gather_positions(hidden[layer], image_index).float().cpu()
            check.equals_reference = bool(torch.allclose(tokens, expected, atol=tolerance,
                                                         rtol=tolerance))
        check.problem = point_problem(check)
        report.points.append(check)
    try:
        report.generation = adapter.generate(model, images, [adapter.prompt] * len(images),
                                             max_new_tokens=4, device=device)
    except Exception as e:  # noqa: BLE001
        report.generation_problem = (f"generation failed: {type(e).__name__}: {e}. Fix: see "
                                     f"vlmprobe.models.published_code for the mends vlmprobe "
                                     f"makes; this code needs one it does not yet make.")
    report.seconds = time.perf_counter() - started
    return report


def point_problem(check: PointCheck) -> str:
    if not check.finite:
        return ("non-finite values. Fix: look for uninitialised buffers (see the buffers line) "
                "or a dtype the code does not cast")
    if not check.equals_full_pass:
        return ("early exit differs from the full pass. Fix: the point's module must not depend "
                "on anything computed after it; report it as a vlmprobe bug")
    if check.equals_reference is False:
        return ("differs from output_hidden_states of a correctly initialised model. Fix: "
                "check the buffers line, and the family's image_token_index")
    return ""


def format_report(report: DoctorReport) -> str:
    lines = [f"vlmprobe doctor: {report.entry} ({report.checkpoint}), {report.dtype}, "
             f"{report.device}"]
    if report.load_problem:
        return "\n".join([*lines, f"FAIL  {report.load_problem}"])
    lines.append("| point | kind | tokens | grids | finite | = full pass | = hidden_states | "
                 "status |")
    lines.append("|---|---|---|---|---|---|---|---|")
    mark = {True: "yes", False: "NO", None: "n/a"}
    for p in report.points:
        lines.append(f"| {p.point} | {p.kind} | {p.tokens} | {p.grids} | {mark[p.finite]} | "
                     f"{mark[p.equals_full_pass]} | {mark[p.equals_reference]} | "
                     f"{'ok' if p.ok else 'FAIL: ' + p.problem} |")
    buffers = f"FAIL: {report.buffers_problem}" if report.buffers_problem else "ok"
    lines.append(f"buffers: {buffers}")
    if report.generation_problem:
        lines.append(f"generation: FAIL: {report.generation_problem}")
    else:
        lines.append(f"generation: ok {report.generation!r}")
    for mend in report.mends:
        lines.append(f"mend: {mend}")
    lines.append(f"{'OK' if report.ok else 'FAILED'} in {report.seconds:.1f} s")
    return "\n".join(lines)


def checkpoint_source(entry: RegistryEntry, local: Path | None, project_root: Path,
                      workdir: Path) -> Path:
    """The folder holding `entry`'s code and config: `--local`, the entry's local path, its
    pinned hub revision in the local hub cache (code and config only: weights are never
    fetched), or for a random-weights entry its config (and code) written to `workdir`."""
    from vlmprobe.models.base import WeightsUnavailable, resolve_pretrained

    weights = entry.weights
    if local is not None:
        folder = local
    elif weights.get("source") == "random":
        adapter = adapter_for(entry)
        folder = workdir / "source"
        folder.mkdir(parents=True)
        if weights.get("code_dir"):
            for path in adapter._code_dir().glob("*.py"):
                shutil.copy2(path, folder / path.name)
        adapter.model_config(project_root).save_pretrained(str(folder))
    else:
        location, extra = resolve_pretrained(entry, project_root)
        folder = Path(location)
        if weights.get("source") == "hub":
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(
                    location, revision=extra["revision"],
                    allow_patterns=["*.py", "*.json", *PREPROCESSING_FILES]))
            except Exception as e:  # noqa: BLE001 - offline, not cached, unknown revision
                raise WeightsUnavailable(
                    f"model {entry.name!r}: the code and config of {location} at "
                    f"{extra['revision']} are not in the hub cache and no hub is reachable "
                    f"({type(e).__name__}). Fix: run `vlmprobe doctor {entry.name}` where the "
                    f"hub is reachable once, or pass --local /path/to/checkpoint."
                ) from e
    if not (folder / "config.json").is_file():
        raise WeightsUnavailable(f"{folder} has no config.json: vlmprobe doctor needs a "
                                 f"checkpoint folder (or its code and config). Fix: pass "
                                 f"--local /path/to/checkpoint.")
    return folder


def run_doctor(name: str, local: Path | None, dtypes: list[str], project_root: Path) -> int:
    """The `vlmprobe doctor` command: print one table per dtype; 0 if every check passed."""
    import tempfile

    from vlmprobe.models.registry import get_entry

    template = get_entry(name)
    with tempfile.TemporaryDirectory(prefix="vlmprobe-doctor-") as tmp:
        source = checkpoint_source(template, local, project_root, Path(tmp))
        entry = build_tiny_checkpoint(template, source, Path(tmp) / "checkpoint")
        reports = [check_checkpoint(entry, DTYPES[d], project_root) for d in dtypes]
    for report in reports:
        print(format_report(report))
    return 0 if all(r.ok for r in reports) else 1
