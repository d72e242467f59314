"""Stage `extract`: features of every extraction point of `vlm` for every image and clip frame.

Params are validated and the registry and points checked before any weights load. Work goes
to a scratch directory keyed by everything that determines the features (entry, settings, data
and pixels, model code, weights: `vlmprobe.extract.scratch`), so an interrupted run (even
`kill -9`) resumes from its last complete shard and a changed setup starts clean; each
finished store is moved onto `--out` / `--clip-out` in one rename. Clip frames are stored as
images `clip_id * n_frames + t`. `--metrics` records sizes, speed and provenance. dvc.yaml
passes every path.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from vlmprobe.data.dataset import SPLITS, load_all_images
from vlmprobe.errors import MissingInput, stage_main
from vlmprobe.extract import distributed, placement
from vlmprobe.extract.distributed import ONE_PROCESS, Ranks
from vlmprobe.extract.engine import (
    CPU_BATCH_SIZE,
    NonFiniteFeatures,
    choose_batch_size,
    extract_shards,
    write_store_manifest,
)
from vlmprobe.extract.placement import require_max_memory
from vlmprobe.extract.scratch import finish, scratch_path, scratch_store
from vlmprobe.gpus import claim_device, require_device
from vlmprobe.io import write_json
from vlmprobe.models.base import dtype_for
from vlmprobe.models.registry import adapter_for, get_entry, select_points
from vlmprobe.models.vlm import VLMAdapter
from vlmprobe.params import (
    ParamsError,
    get,
    load_params,
    require_choice,
    require_int,
    require_name,
    resolve_names,
)

PARAMS = ("vlm", "extract")


def validate(params: dict) -> dict:
    """Every param, the device and the entry's points checked, without loading weights: the
    points against the model's config, which also refuses an unpinned revision."""
    entry = get_entry(require_name(params, "vlm"))
    points = select_points(entry, get(params, "extract.points"))
    config = {
        "entry": entry,
        "points": points,
        "clip_points": clip_points(points, get(params, "extract.clip_points")),
        "batch_size": batch_size_param(params),
        "shard_size": require_int(params, "extract.shard_size", 1, 100_000),
        "device": require_device(params, "extract.device"),
        "loader_workers": require_int(params, "extract.loader_workers", 0, 64),
        "processes": require_int(params, "extract.processes", 1, 1024),
        "device_map": require_choice(params, "extract.device_map", ("none", "auto")),
        "max_memory": require_max_memory(get(params, "extract.max_memory")),
        "adapter": adapter_for(entry),
    }
    if (config["processes"] > 1 and config["device"].type == "cuda"
            and config["processes"] > torch.cuda.device_count()):
        raise ParamsError(
            f"params.yaml: extract.processes = {config['processes']} on CUDA, but "
            f"{torch.cuda.device_count()} GPUs are visible: one process per GPU. Fix: `dvc exp "
            f"run -S extract.processes={torch.cuda.device_count()}`.")
    if config["device_map"] == "auto":
        if not isinstance(config["adapter"], VLMAdapter):
            raise ParamsError(
                f"params.yaml: extract.device_map = 'auto' splits a VLM over devices; "
                f"{entry.name!r} is not one (a spatial encoder, raw pixels, or a hybrid, whose "
                "parts each run on one device). Fix: `dvc exp run -S extract.device_map=none`.")
        if config["processes"] > 1:
            raise ParamsError(
                "params.yaml: extract.device_map = 'auto' spreads one model over every device, "
                f"so it runs in one process, not extract.processes = {config['processes']}. "
                "Fix: `dvc exp run -S extract.processes=1`.")
    config["adapter"].check_points(points, Path.cwd())
    return config


def batch_size_param(params: dict) -> int | str:
    """`extract.batch_size`: an integer, or `auto` (the largest that fits on the GPU)."""
    value = get(params, "extract.batch_size")
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ParamsError(
            f"params.yaml: extract.batch_size = {value!r} is invalid; expected `auto` (the "
            f"largest batch that fits on the GPU; {CPU_BATCH_SIZE} on CPU) or an integer in "
            "[1, 4096]. Fix: `dvc exp run -S extract.batch_size=auto`."
        )
    return value


def clip_points(points: list[str], requested: str | list[str]) -> list[str]:
    """The points extracted for clip frames: `deepest` (of `points`), `all`, or a list.

    Clips have eight frames each, so every extra point costs eight times an image's storage.
    """
    return resolve_names(requested, "extract.clip_points", points, ("deepest", "all"))


def scratch_key(config: dict, device: torch.device, data_files: list[Path], points: list[str],
                frames: np.ndarray, model_identity: dict) -> dict:
    """Everything that determines a shard: entry, settings, data, pixels, model code, weights."""
    def sha256(data: bytes | np.ndarray) -> str:
        return hashlib.sha256(data).hexdigest()

    return {
        "entry": sha256(config["entry"].path.read_bytes()),
        "settings": {"points": points, "shard_size": config["shard_size"],
                     "batch_size": config["batch_size"], "device": device.type,
                     "device_map": config["device_map"],
                     "max_memory": {str(k): v for k, v in config["max_memory"].items()}},
        "data": {path.name: sha256(path.read_bytes()) for path in data_files},
        # The decoded pixels the model sees: an image edited in place keeps its JSON.
        "pixels": sha256(np.ascontiguousarray(frames)),
        **model_identity,
    }


def load_clip_frames(clips_dir: Path) -> tuple[list[int], np.ndarray, list[int], int]:
    """Every frame of every clip as an image: ids `clip_id * n_frames + t`, frames, clip ids."""
    path = clips_dir / "clips.npz"
    if not path.is_file():
        raise MissingInput(f"{path} not found; run `dvc repro data` to generate the clips.")
    with np.load(path) as clips:
        frames, clip_ids = clips["frames"], [int(c) for c in clips["clip_id"]]
    n_frames = frames.shape[1]
    ids = [c * n_frames + t for c in clip_ids for t in range(n_frames)]
    return ids, frames.reshape(-1, *frames.shape[2:]), clip_ids, n_frames


def publish(work: Path, out: Path) -> None:
    """Move a finished scratch store onto `out`."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--clips", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clip-out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    # Scratch space, not a pipeline output (dvc.yaml does not name it).
    parser.add_argument("--work", type=Path, default=Path(".vlmprobe"))
    args = parser.parse_args(argv)
    config = validate(load_params(PARAMS))
    if config["processes"] > 1 and not distributed.launched():
        return distributed.relaunch(config["processes"], "vlmprobe.stages.extract",
                                    sys.argv[1:] if argv is None else argv)
    if distributed.launched():
        ranks, device = distributed.start(config["device"])
    elif config["device_map"] == "auto":  # every card
        ranks, device = ONE_PROCESS, config["device"]
    else:
        ranks, device = ONE_PROCESS, claim_device(config["device"])
    try:
        extract(args, config, ranks, device)
    finally:
        distributed.stop()
    return 0


def extract(args: argparse.Namespace, config: dict, ranks: Ranks, device: torch.device) -> None:
    """The stage's work in one process, or in one rank of several (`ranks`)."""
    torch.manual_seed(0)
    entry, adapter = config["entry"], config["adapter"]
    image_ids, images = load_all_images(args.data, config["loader_workers"])
    clip_ids, clip_frames, clips, n_frames = load_clip_frames(args.clips)
    if config["device_map"] == "auto":
        # Built on the CPU in the target dtype, then split over the devices.
        model, device_map = placement.dispatch(
            adapter.load(Path.cwd(), torch.device("cpu"), dtype=dtype_for(device)),
            config["max_memory"], args.work / "offload" / entry.name, adapter.dtype,
            adapter.preload_modules)
        print(f"{entry.name}: split over {placement.devices_used(device_map)}")
    else:
        model = adapter.load(Path.cwd(), device)
    provenance = adapter.weights_provenance(Path.cwd())
    model_identity = adapter.code_and_weights_identity(
        Path.cwd(), args.work / "file-hashes.json")
    if config["batch_size"] == "auto":
        chosen, batch_choice = choose_batch_size(
            adapter, model, images, config["points"], device, config["shard_size"])
        config["batch_size"] = int(distributed.reduce(chosen, "min"))  # every rank the same
    else:
        batch_choice = "params.yaml"
    processes = f", {ranks.world} processes" if ranks.world > 1 else ""
    if ranks.main:
        print(f"{entry.display_name}: points {', '.join(config['points'])} on "
              f"{len(image_ids)} images and {len(clip_ids)} clip frames, batch size "
              f"{config['batch_size']} ({batch_choice}){processes}")
    common = {
        "vlm": entry.name,
        "display_name": entry.display_name,
        "family": entry.family,
        "weights": provenance,
    }
    jobs = [
        ("images", [args.data / f"instances_{s}.json" for s in SPLITS], config["points"],
         image_ids, images, args.out, {"dataset": str(args.data)}),
        ("clips", [args.clips / "clips.npz"], config["clip_points"], clip_ids, clip_frames,
         args.clip_out, {"dataset": str(args.clips), "n_frames": n_frames, "clip_ids": clips}),
    ]
    timings, manifests, finished = {}, {}, []
    for name, data_files, points, ids, frames, out, extra in jobs:
        key = scratch_key(config, device, data_files, points, frames, model_identity)
        prefix = f"extract-{name}-{entry.name}"
        # Rank 0 readies the scratch store (stale stores and unfinished shards removed).
        work = scratch_store(args.work, prefix, key) if ranks.main else scratch_path(
            args.work, prefix, key)
        distributed.barrier()
        try:
            figures = extract_shards(
                adapter, model, frames, ids, points, work, batch_size=config["batch_size"],
                shard_size=config["shard_size"], device=device, ranks=ranks)
        except NonFiniteFeatures as e:
            raise SystemExit(f"error: {entry.name} {name}: {e}") from None
        distributed.barrier()
        timings[name] = {"images": int(distributed.reduce(figures["images"], "sum")),
                         "seconds": distributed.reduce(figures["seconds"], "max")}
        if ranks.main:
            manifests[name] = write_store_manifest(
                adapter, work, points, ids, math.ceil(len(ids) / config["shard_size"]),
                tuple(frames.shape[1:3]), {**common, **extra})
        finished.append((work, out))
    if not ranks.main:
        return
    # Publish only once both stores are complete, so a run killed during the clips still
    # finds the images' scratch store and resumes instead of starting over.
    for work, out in finished:
        finish(work)
        publish(work, out)
    batching = {"batch_size": config["batch_size"], "batch_size_choice": batch_choice,
                "processes": ranks.world, "device_map": config["device_map"]}
    write_json(args.metrics,
               extraction_metrics(manifests, timings, device, provenance, batching))


def extraction_metrics(manifests: dict, timings: dict, device: torch.device,
                       provenance: dict, batching: dict) -> dict:
    """What metrics/extract.json records: sizes per point, speed, device, batching, weights."""
    images = manifests["images"]
    extracted = sum(t["images"] for t in timings.values())
    seconds = sum(t["seconds"] for t in timings.values())
    return {
        "vlm": images["vlm"],
        "device": device.type,
        "dtype": str(dtype_for(device)).removeprefix("torch."),
        "stored_dtype": images["dtype"],
        "images": len(images["image_ids"]),
        "clip_frames": len(manifests["clips"]["image_ids"]),
        # Over the images this run computed (a resumed run skips finished shards); null if none.
        "seconds_per_image": round(seconds / extracted, 4) if extracted else None,
        **batching,
        "points": {p: {"n_tokens": info["n_tokens"], "dim": info["dim"]}
                   for p, info in images["points"].items()},
        "weights": provenance,
    }


if __name__ == "__main__":
    sys.exit(stage_main(main))
