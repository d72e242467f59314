"""Stage `extract`: features of every extraction point of `vlm` for every image.

Params are validated and the registry checked before any model loads. Work goes to a
scratch directory keyed by everything that determines the features, so an interrupted run
resumes; the finished store is moved onto `data/features` in one rename.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from vlmprobe.data.dataset import SPLITS, load_all_images
from vlmprobe.extract.engine import extract_to_store
from vlmprobe.models.base import WeightsUnavailable
from vlmprobe.models.registry import RegistryError, adapter_for, get_entry, select_points
from vlmprobe.params import ParamsError, get, load_params, require_choice, require_int

PARAMS = ("vlm", "extract")
DEVICES = ("cpu", "cuda", "auto")


def validate(params: dict) -> dict:
    entry = get_entry(get(params, "vlm"))
    return {
        "entry": entry,
        "points": select_points(entry, get(params, "extract.points")),
        "batch_size": require_int(params, "extract.batch_size", 1, 4096),
        "shard_size": require_int(params, "extract.shard_size", 1, 100_000),
        "device": require_choice(params, "extract.device", DEVICES),
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError(
            "params.yaml: extract.device = 'cuda' but no CUDA device is visible. "
            "Fix: `dvc exp run -S extract.device=cpu` (or auto)."
        )
    return torch.device(name)


def fingerprint(config: dict, data_dir: Path) -> str:
    """Hash of everything that determines the features: entry, points, shards, dataset."""
    h = hashlib.sha256()
    entry = config["entry"]
    h.update(entry.path.read_bytes())
    h.update(json.dumps([config["points"], config["shard_size"]]).encode())
    for split in SPLITS:
        h.update((data_dir / f"instances_{split}.json").read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--out", type=Path, default=Path("data/features"))
    parser.add_argument("--work", type=Path, default=Path(".vlmprobe"))
    args = parser.parse_args(argv)
    try:
        params = load_params(PARAMS)
        config = validate(params)
        device = resolve_device(config["device"])
    except (ParamsError, RegistryError) as e:
        raise SystemExit(f"error: {e}") from None

    torch.manual_seed(0)
    entry = config["entry"]
    adapter = adapter_for(entry)
    image_ids, images = load_all_images(args.data)
    work = args.work / f"extract-{entry.name}-{fingerprint(config, args.data)}"
    try:
        model = adapter.load(Path.cwd(), device)
        provenance = adapter.weights_provenance(Path.cwd())
    except WeightsUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{entry.display_name}: points {', '.join(config['points'])} on {len(image_ids)} images")
    extract_to_store(
        adapter,
        model,
        images,
        image_ids,
        config["points"],
        work,
        batch_size=config["batch_size"],
        shard_size=config["shard_size"],
        device=device,
        manifest_extra={
            "vlm": entry.name,
            "display_name": entry.display_name,
            "family": entry.family,
            "weights": provenance,
            "dataset": str(args.data),
        },
    )
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, args.out)


if __name__ == "__main__":
    sys.exit(main())
