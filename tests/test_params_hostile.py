"""Hostile params (issue 17): each bad edit of params.yaml is caught by `vlmprobe validate`, in
seconds and without loading a model, with an error naming the value, the choices and the fix.

Every row is one edit of the project's params.yaml and a fragment its error must contain. The
schema is the committed params.yaml, so the tests commit the working tree's params.yaml in a
throwaway repo (beside dvc.yaml): they hold whether or not a new key is committed yet.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, stage_args, tool_env
from vlmprobe.cli import validate
from vlmprobe.errors import stage_main
from vlmprobe.stages import select

MISSING = object()  # as a row's value: delete the key
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def dvc_yaml(tmp_path_factory) -> Path:
    """dvc.yaml of a git repo whose committed params.yaml is the project's."""
    repo = tmp_path_factory.mktemp("schema")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    commit(repo)
    return repo / "dvc.yaml"


def commit(repo: Path) -> None:
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "params"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, env=tool_env())


def edited(changes: dict[str, object]) -> dict:
    """The project's params with `changes` (dotted key -> value, or MISSING) applied."""
    params = copy.deepcopy(DEFAULTS)
    for key, value in changes.items():
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        if value is MISSING:
            del node[last]
        else:
            node[last] = value
    return params


def coco_source(root: Path, n_images: int) -> dict[str, object]:
    """A local COCO copy's params: an annotation file of `n_images` annotated images."""
    (root / "val2017").mkdir()
    annotations = root / "instances.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64}
                   for i in range(n_images)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8],
                         "area": 64, "iscrowd": 0, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]}
                        for i in range(n_images)],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    return {"data.dataset": "coco", "data.coco.images": str(root / "val2017"),
            "data.coco.annotations": str(annotations)}


def ssv2_source(root: Path, n_videos: int) -> dict[str, object]:
    """A local SSv2 copy's params: labels of `n_videos` directional videos."""
    (root / "videos").mkdir()
    labels = root / "labels.json"
    labels.write_text(json.dumps([
        {"id": str(i), "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right"} for i in range(n_videos)]))
    return {"data.dataset": "ssv2", "data.ssv2.videos": str(root / "videos"),
            "data.ssv2.labels": str(labels)}


HOSTILE = [
    # Unknown and missing keys, against the committed params.yaml.
    ("misspelled key", {"probe.detr.step": 2000, "probe.detr.steps": MISSING},
     "unknown key `probe.detr.step`; did you mean `steps`? Valid keys of `probe.detr`: points"),
    ("misspelled nested key", {"data.shapes.ntrain": 9},
     "unknown key `data.shapes.ntrain`; did you mean `n_train`?"),
    ("unknown top-level key", {"foo": 1},
     "unknown key `foo`. Valid keys of the top level: vlm, assets, data"),
    ("deleted key", {"probe.seed": MISSING},
     "`probe.seed` is missing. Fix: add it back under `probe:`, e.g. `seed: 0`"),
    ("section replaced by a value", {"data.shapes": 5},
     "`data.shapes` = 5 must be a section with the keys n_train"),
    # Unclear messages.
    ("unknown speed baseline", {"select.speed_baseline": "qwen9"},
     "Fix: `dvc exp run -S select.speed_baseline=<one of those>`"),
    ("no extraction points", {"extract.points": []},
     "extract.points = [] is invalid; expected `all`, `deepest` or a non-empty list of: "
     "layer3, layer6, layer9, layer12, final"),
    ("batch size neither a number nor auto", {"extract.batch_size": "max"},
     "extract.batch_size = 'max' is invalid; expected `auto` (the largest batch that fits on "
     "the GPU; 16 on CPU) or an integer in [1, 4096]. Fix: `dvc exp run -S "
     "extract.batch_size=auto`."),
    # In-range nonsense.
    ("no dense controls", {"probe.dense.controls": []},
     "probe.dense.controls = [] is invalid; expected `all`, `deepest`, `none` (run it nowhere)"),
    ("no temporal controls", {"probe.temporal.controls": []},
     "probe.temporal.controls = [] is invalid"),
    ("no reconstruct controls", {"reconstruct.controls": []},
     "reconstruct.controls = [] is invalid; expected a non-empty list of: pixels, shuffled"),
    ("no DETR points", {"probe.detr.points": []}, "probe.detr.points = [] is invalid"),
    ("no training at all", {"reconstruct.warmup_epochs": 0, "reconstruct.epochs": 0},
     "reconstruct.warmup_epochs = 0 and reconstruct.epochs = 0 train the adapter not at all"),
    ("unknown probe point", {"probe.detr.points": ["nope"]},
     "probe.detr.points names 'nope'; valid choices: layer3, layer6, layer9, layer12, final"),
    ("unknown reconstruct point", {"reconstruct.point": "layer99"},
     "reconstruct.point = 'layer99' is invalid; expected `best` (the align stage's optimal "
     "layer) or an extracted point id: layer3, layer6, layer9, layer12, final"),
    ("unpinned revision", {"vlm": "cogvlm2"},
     "weights.revision = None in"),
    # Entry names become output paths (dvc.yaml's `results/p4/${vlm}-spatial.md`).
    ("model name shaped like a path", {"vlm": "../../x"},
     "vlm = '../../x' is not a registry entry name: expected a plain identifier"),
    ("VAE name shaped like a path", {"video_vae": "../x"},
     "video_vae = '../x' is not a registry entry name"),
]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
ROWS = [pytest.param(*row, id=row[0]) for row in HOSTILE] + [
    pytest.param("cuda without a GPU", {"extract.device": "cuda"},
                 "extract.device = 'cuda' but no CUDA device is visible. Fix: `dvc exp run -S "
                 "extract.device=cpu`", marks=NO_CUDA, id="cuda without a GPU"),
    pytest.param("cuda without a GPU, ground", {"ground.device": "cuda"},
                 "ground.device = 'cuda' but no CUDA device", marks=NO_CUDA,
                 id="cuda without a GPU, ground"),
]


def run_validate(tmp_path: Path, params: dict, dvc_yaml: Path) -> list[str]:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return validate(path, dvc_yaml)


@pytest.mark.parametrize(("case", "changes", "fragment"), ROWS)
def test_validate_catches_each_hostile_edit(tmp_path, dvc_yaml, case, changes, fragment):
    errors = run_validate(tmp_path, edited(changes), dvc_yaml)
    assert any(fragment in e for e in errors), "\n".join(errors) or f"{case}: no error"


@pytest.mark.parametrize(("source", "fragment"), [
    (coco_source, "has 5 annotated images, fewer than the 1000299 asked for "
                  "(data.coco.n_train + n_val + n_test). Fix: lower them to 5 in all."),
    (ssv2_source, "lists 5 videos of the directional templates, fewer than the 1000149"),
])
def test_split_sizes_are_checked_against_a_local_dataset(tmp_path, dvc_yaml, source, fragment):
    section = "coco" if source is coco_source else "ssv2"
    params = edited({**source(tmp_path, 5), f"data.{section}.n_train": 999_999})
    errors = run_validate(tmp_path, params, dvc_yaml)
    assert any(fragment in e for e in errors), "\n".join(errors)


def test_the_project_params_are_valid(tmp_path, dvc_yaml):
    assert run_validate(tmp_path, edited({}), dvc_yaml) == []


def test_malformed_yaml_is_one_line_with_line_and_column(tmp_path, dvc_yaml):
    path = tmp_path / "params.yaml"
    path.write_text("vlm: dinov2_small\nprobe:\n  seed: [0\n")
    (error,) = validate(path, dvc_yaml)
    assert error.startswith(f"{path}:4:1: malformed YAML: ") and "Fix:" in error


BAD_FILES = [
    ("vlm: dinov2_small\nprobe:\n  seed: 0\n bootstrap: 9\n", ":4:2: malformed YAML"),
    ("vlm: dinov2_small\ndata:\n\tseed: 0\n", ":3:1: malformed YAML: found character '\\t'"),
    ("probe: {seed: 0\n", "malformed YAML"),
    ("probe: {detr: {step: 9}}\n", "unknown key `probe.detr.step`; did you mean `steps`?"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_FILES)
def test_cli_prints_one_line_and_no_traceback(tmp_path, dvc_yaml, text, fragment):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "vlmprobe.cli", "validate", "--params", str(path),
         "--dvc-yaml", str(dvc_yaml)], capture_output=True, text=True, env=tool_env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr
    if "malformed" in fragment:
        assert result.stderr.count("\n") == 1, result.stderr


@pytest.fixture
def committed_project(tmp_path, monkeypatch) -> Path:
    """A git repo holding the project's params.yaml, committed, as the working directory."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    commit(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_stage_refuses_an_unknown_key_in_its_sections(committed_project, capsys):
    params = edited({"select.speed_baselin": "qwen2_5_vl"})
    (committed_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert stage_main(lambda: select.main(stage_args("select"))) == 1
    assert ("unknown key `select.speed_baselin`; did you mean `speed_baseline`?"
            in capsys.readouterr().err)


def test_a_stage_reports_malformed_yaml_in_one_line(committed_project, capsys):
    (committed_project / "params.yaml").write_text("vlm: [dinov2_small\n")
    assert stage_main(lambda: select.main(stage_args("select"))) == 1
    assert re.fullmatch(r"error: params.yaml:2:1: malformed YAML: [^\n]*\n",
                        capsys.readouterr().err)

