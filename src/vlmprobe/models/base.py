"""The interface every model family implements, and the rules for loading weights safely."""

from __future__ import annotations

import hashlib
import inspect
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vlmprobe.errors import VlmprobeError
from vlmprobe.extract.digests import file_digests
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.hooks import capture_outputs
from vlmprobe.models.box_text import parse_box
from vlmprobe.models.registry import RegistryEntry


class WeightsUnavailable(VlmprobeError, RuntimeError):
    """The entry's weights cannot be found or may not be loaded; the message says the fix."""


class NotGenerating(RuntimeError):
    """The model does not generate text (a vision encoder, raw pixels)."""


REVISION = re.compile(r"^[0-9a-f]{40}$")
CODE_SUFFIXES = (".py", ".json")


def dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what the checkpoints are published in); fp32 on CPU, where bf16 is slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def code_revision(directory: Path) -> str:
    """40-hex SHA-1 over a local model directory's code and config files (names and bytes).

    A local directory has no commit, so this digest is what a registry entry pins for it: the
    remote code that runs is exactly the code that was reviewed.
    """
    digest = hashlib.sha1()
    for path in sorted(p for p in directory.iterdir() if p.suffix in CODE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class ModelAdapter(ABC):
    """Loads one family's model, prepares its inputs and locates its extraction points.

    The extractor only calls these methods; it knows nothing family-specific. Families that
    generate text also answer prompts (`generate`); the grounding stage reads `generates`,
    `box_format` and `grounding_template` and knows nothing family-specific either.
    """

    generates: ClassVar[bool] = False
    # How the family writes a box when asked to ground an object (a key of
    # vlmprobe.models.box_text.BOX_FORMATS), and the request that asks for it ({object}: "red
    # circle"). None: the family has no grounding output; it can still answer questions.
    box_format: ClassVar[str | None] = None
    grounding_template: ClassVar[str | None] = None

    def __init__(self, entry: RegistryEntry):
        self.entry = entry

    @abstractmethod
    def load(self, project_root: Path, device: torch.device) -> nn.Module:
        """Build the model in eval mode on `device`; raise WeightsUnavailable if it cannot."""

    @abstractmethod
    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        """Model inputs for a batch of (B, H, W, 3) uint8 images."""

    def capture(self, model: nn.Module, inputs: dict[str, Any],
                points: list[str]) -> dict[str, torch.Tensor]:
        """The spatial tokens (B, T, D) of every point, in geometry order, for prepared `inputs`:
        one forward pass with a hook on each point's module, stopped after the deepest. A model
        built of parts (a hybrid) captures part by part instead."""
        modules = {p: self.point_module(model, p) for p in points}
        outputs = capture_outputs(modules, lambda: self.forward(model, inputs))
        return {p: self.point_tokens(p, outputs[p], inputs) for p in points}

    # What the hooks of `capture` read: every family with one module per point implements both.
    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        """The module whose forward output holds `point`."""
        raise NotImplementedError(f"{type(self).__name__} has no module per point: it overrides "
                                  "`capture`")

    def point_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The spatial tokens (B, T, D) of `point` from its module's output, in geometry order."""
        raise NotImplementedError(f"{type(self).__name__} has no module per point: it overrides "
                                  "`capture`")

    @abstractmethod
    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        """Where each of the point's tokens lies on an image of `image_size` (H, W)."""

    def check_points(self, points: list[str], project_root: Path) -> None:  # noqa: B027
        """Reject a point the model does not have (e.g. a layer past its depth) before loading.

        Families whose points all exist by construction keep this no-op."""

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return model(**inputs)

    def weights_provenance(self, project_root: Path) -> dict[str, Any]:
        """What produced the weights, recorded beside every result."""
        return dict(self.entry.weights)

    def code_and_weights_identity(self, project_root: Path,
                                  hash_cache: Path | None = None) -> dict[str, Any]:
        """What determines this adapter's features besides its entry file: code and weights.

        `code`: sha256 of every vlmprobe module the adapter class is built from (its family
        module and the shared ones); `remote_code`: `code_revision` of the remote-code
        directory (`weights.code_dir`) or local checkpoint directory; `revision`: the pinned
        revision; `weights`: sha256 of every file of a local checkpoint (bytes, not sizes and
        mtimes), remembered in `hash_cache` so a big checkpoint is not re-read on every run.
        """
        sources = {cls.__module__: Path(inspect.getsourcefile(cls))
                   for cls in type(self).__mro__ if cls.__module__.startswith("vlmprobe.")}
        identity: dict[str, Any] = {
            "code": {module: hashlib.sha256(path.read_bytes()).hexdigest()
                     for module, path in sorted(sources.items())},
            "revision": self.entry.weights.get("revision"),
        }
        directories = {}
        if self.entry.weights.get("code_dir"):
            # Relative to this package (`/` keeps an absolute code_dir as it is).
            directories["code_dir"] = Path(__file__).parent / self.entry.weights["code_dir"]
        if self.entry.weights.get("source") in ("asset", "local"):
            checkpoint = Path(resolve_pretrained(self.entry, project_root)[0])
            files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
            identity["weights"] = {str(path.relative_to(checkpoint)): digest
                                   for path, digest in file_digests(files, hash_cache).items()}
            directories["checkpoint"] = checkpoint
        identity["remote_code"] = {name: code_revision(path)
                                   for name, path in directories.items()}
        return identity

    def parse_grounding(self, answer: str, image_size: tuple[int, int]) -> np.ndarray | None:
        """The box a grounding answer names, as xyxy pixels of an `image_size` (H, W) image, or
        None where it names no usable one. Families whose processor parses its own location
        tokens override this with that post-processing."""
        return parse_box(answer, self.box_format, image_size)

    def generate(self, model: nn.Module, images: np.ndarray, prompts: list[str],
                 max_new_tokens: int, device: torch.device) -> list[str]:
        """The model's greedy answer to `prompts[i]` about `images[i]`, decoded, one batch."""
        raise NotGenerating(f"model {self.entry.name!r} ({self.entry.family}) does not "
                            "generate text")


def resolve_pretrained(entry: RegistryEntry, project_root: Path) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` should load the entry's weights from, and with which kwargs.

    `weights.source`: `asset` (converted by the `assets` stage, under the project),
    `local` (a directory the user supplies) or `hub` (a hub id at a pinned revision; with
    HF_HUB_OFFLINE=1 only a local hub cache can satisfy it).
    """
    weights = entry.weights
    source = weights.get("source")
    if source in ("asset", "local"):
        path = Path(weights["path"])
        path = path if path.is_absolute() else project_root / path
        if not (path / "config.json").exists():
            fix = (
                "run `dvc repro assets`"
                if source == "asset"
                else f"put the checkpoint there or edit weights.path in {entry.path}"
            )
            raise WeightsUnavailable(
                f"model {entry.name!r}: no weights at {path} (config.json missing). Fix: {fix}."
            )
        return str(path), {}
    if source == "hub":
        revision = weights.get("revision")
        if not isinstance(revision, str) or not REVISION.match(revision):
            raise WeightsUnavailable(
                f"model {entry.name!r}: weights.revision = {revision!r} in {entry.path} is not a "
                f"pinned 40-hex commit of {weights.get('repo_id')!r}; a revision must be pinned "
                f"so the weights (and any remote code) are exactly the reviewed ones. Fix: set "
                f"weights.revision to the commit sha, or use a `source: local` entry."
            )
        return weights["repo_id"], {"revision": revision}
    raise WeightsUnavailable(
        f"{entry.path}: weights.source {source!r} is not one of asset, local, hub"
    )


def remote_code_kwargs(entry: RegistryEntry, location: str) -> dict[str, Any]:
    """`trust_remote_code` for `from_pretrained`/`from_config`, or a refusal.

    Remote code runs only when the entry opts in (`weights.trust_remote_code: true`) AND pins a
    40-hex revision: the hub commit, or for a local directory its `code_revision`.
    """
    weights = entry.weights
    if not weights.get("trust_remote_code"):
        raise WeightsUnavailable(
            f"model {entry.name!r}: {location} needs remote code, and {entry.path} does not "
            f"allow it. Fix: review the code, then set weights.trust_remote_code: true and pin "
            f"weights.revision."
        )
    revision = weights.get("revision")
    if not isinstance(revision, str) or not REVISION.match(revision):
        raise WeightsUnavailable(
            f"model {entry.name!r}: remote code refused: weights.revision = {revision!r} in "
            f"{entry.path} is not a 40-hex revision; a revision must be pinned before remote "
            f"code runs. Fix: pin the hub commit sha (or, for a local directory, its "
            f"vlmprobe.models.base.code_revision)."
        )
    directory = Path(location)
    if directory.is_dir():
        actual = code_revision(directory)
        if actual != revision:
            raise WeightsUnavailable(
                f"model {entry.name!r}: remote code refused: the code in {directory} has "
                f"revision {actual}, but {entry.path} pins {revision}. Fix: review the changed "
                f"code, then pin weights.revision: {actual}."
            )
    return {"trust_remote_code": True}


def hub_lacks_revision(error: BaseException) -> bool:
    """Whether a failed load is the hub answering that the revision does not exist (transformers
    wraps huggingface_hub's RevisionNotFoundError in an OSError), not the hub being offline."""
    from huggingface_hub.errors import RevisionNotFoundError

    seen: BaseException | None = error
    for _ in range(8):  # a short chain of causes; bounded
        if seen is None:
            return False
        if isinstance(seen, RevisionNotFoundError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unknown_revision(entry: RegistryEntry) -> WeightsUnavailable:
    """The refusal for a pinned revision the hub does not have."""
    weights = entry.weights
    where = weights.get("pinned_in") or entry.path
    return WeightsUnavailable(
        f"model {entry.name!r}: the hub has no revision {weights.get('revision')} of "
        f"{weights.get('repo_id')!r} (pinned in {where}). Fix: `vlmprobe pin {entry.name}` where "
        f"the hub is reachable, to pin its current commit, or set weights.revision to a commit "
        f"of {weights.get('repo_id')}."
    )


def load_pretrained(loader: Any, entry: RegistryEntry, project_root: Path, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with a clear error when the weights cannot be had."""
    location, extra = resolve_pretrained(entry, project_root)
    try:
        return loader.from_pretrained(location, **extra, **kwargs)
    except OSError as e:
        if hub_lacks_revision(e):
            raise unknown_revision(entry) from e
        revision = extra.get("revision")
        at = f" at revision {revision}" if revision else ""
        raise WeightsUnavailable(
            f"model {entry.name!r}: cannot load weights of {location!r}{at} "
            f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). No model "
            f"hub is reachable offline. Fix: download the checkpoint where a hub is reachable, "
            f"then either put it in the hub cache (HF_HUB_CACHE, default "
            f"~/.cache/huggingface/hub) or point weights.path of a `source: local` entry at it."
        ) from e
