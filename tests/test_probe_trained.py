"""Trained probes (dense, DETR-style, reconstruction) on a tiny synthetic dataset: their parts on
hand cases, and whole short runs for plumbing and run-to-run determinism."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from dataclasses import replace

import numpy as np
import pytest
import torch

from vlmprobe.assets.lpips_weights import build_lpips
from vlmprobe.data.dataset import SPLITS, load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.metrics.image import Lpips
from vlmprobe.probes.controls import oracle_tokens, pixel_tokens
from vlmprobe.probes.coverage import instance_targets
from vlmprobe.probes.dense import DenseSettings, TokenFrame, run_dense_probe, token_targets
from vlmprobe.probes.detection import Targets
from vlmprobe.probes.detr import (
    DetrSettings,
    grid_reference_boxes,
    hungarian,
    run_detr_probe,
    sine_encoding,
)
from vlmprobe.probes.reconstruction import (
    ReconstructionSettings,
    ScoreSettings,
    run_reconstruction_probe,
)
from vlmprobe.probes.training import FitSettings, batches, mirror_permutation

SIZE, GRID = 96, 6  # 16-px tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny") / "shapes"
    generate_shapes(root, seed=0, image_size=SIZE, n_train=24, n_val=8, n_test=8,
                    min_objects=1, max_objects=2, min_size=20, max_size=36)
    splits = {name: load_split(root, name) for name in SPLITS}
    geometry = TokenGeometry.single_grid((SIZE, SIZE), GRID, GRID)
    oracle = {name: oracle_tokens(instance_targets(s, geometry), 32, 0.01, 0, i)
              for i, (name, s) in enumerate(splits.items())}
    return splits, geometry, oracle


def test_mirror_permutation_reverses_each_row():
    perm = mirror_permutation(TokenGeometry.single_grid((32, 48), 2, 3))
    assert perm.tolist() == [2, 1, 0, 5, 4, 3]


def test_batches_cover_every_index_once_per_epoch():
    drawn = torch.cat(list(batches(10, 5, 4, torch.Generator().manual_seed(0))))
    assert sorted(drawn[:10].tolist()) == list(range(10))
    assert sorted(drawn[10:].tolist()) == list(range(10))


def test_sine_encoding_tells_neighbouring_tokens_apart():
    codes = sine_encoding(torch.tensor([[0.5, 0.5], [0.5 + 1 / 16, 0.5]]), 128)
    assert codes.shape == (2, 128)
    assert torch.linalg.vector_norm(codes[0] - codes[1]) > 1.0


def test_grid_reference_boxes_spread_over_the_image():
    boxes = grid_reference_boxes(16)
    assert sorted(set(boxes[:, 0].tolist())) == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert boxes[:, 2:].eq(0.2).all()


def test_hungarian_pairs_each_object_with_the_query_on_it():
    target = Targets(torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]]),
                     torch.tensor([1, 0]))
    boxes = torch.tensor([[0.75, 0.75, 0.3, 0.3], [0.5, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2]])
    rows, cols = hungarian(torch.zeros(3, 2), boxes, target)
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 2, 1: 0}


def test_dense_targets_and_decoding_are_inverse():
    frame = TokenFrame.of(TokenGeometry.single_grid((64, 64), 4, 4))  # centres 1/8, 3/8, ...
    target = Targets(torch.tensor([[0.0, 0.0, 0.5, 0.3]]), torch.tensor([2]))
    classes, positive, boxes, centreness = token_targets(target, frame, 3)
    # Token centres inside the box: x in {1/8, 3/8}, y = 1/8 -> tokens 0 and 1.
    assert positive.nonzero().flatten().tolist() == [0, 1]
    assert classes[0].tolist() == [0.0, 0.0, 1.0]
    cx, cy = frame.centre[0]
    ltrb = torch.stack([cx - 0.0, cy - 0.0, 0.5 - cx, 0.3 - cy]) / frame.cell[0].repeat(2)
    decoded = frame.decode(ltrb.expand(16, 4))[0]
    torch.testing.assert_close(decoded, boxes[0])
    assert 0 < centreness[0] <= 1


def loop(steps: int, batch_size: int, lr: float, eval_every: int, **options) -> FitSettings:
    return FitSettings(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=0,
                       threads=1, **options)


DENSE = DenseSettings(loop(12, 4, 2e-3, 6), width=16, depth=1, flip=True, bootstrap=100)


def test_dense_probe_runs_and_repeats_exactly(tiny, tmp_path):
    splits, geometry, oracle = tiny
    first, found = run_dense_probe(oracle, splits, geometry, DENSE, tmp_path / "a")
    second, _ = run_dense_probe(oracle, splits, geometry, DENSE, tmp_path / "b")
    assert first == second
    assert {"map50", "map50_ci95", "map", "map_ci95", "val_map50", "selected_step"} <= set(first)
    assert len(found) == len(splits["test"].image_ids)
    assert (tmp_path / "a" / "plots" / "metrics" / "val_map50.tsv").exists()


def test_detr_probe_runs_and_repeats_exactly(tiny, tmp_path):
    splits, geometry, oracle = tiny
    settings = DetrSettings(loop(8, 4, 1e-3, 4), width=32, layers=2, queries=4, heads=2,
                            flip=True, bootstrap=100)
    first, found = run_detr_probe(oracle, splits, geometry, settings, tmp_path / "a")
    second, _ = run_detr_probe(oracle, splits, geometry, settings, tmp_path / "b")
    assert first == second
    assert 0.0 <= first["map50"] <= 1.0 and len(first["map50_ci95"]) == 2
    assert len(found[0].scores) == 4 * 3  # every (query, class) pair
    assert (tmp_path / "a" / "plots" / "metrics" / "train_loss.tsv").exists()


def test_reconstruction_probe_on_pixels(tiny, tmp_path):
    splits, geometry, _ = tiny
    pixels = {n: pixel_tokens(s.images, geometry, 16) for n, s in splits.items()}
    torch.manual_seed(0)
    torch.save(build_lpips("alex").state_dict(), tmp_path / "alex.pth")
    settings = ReconstructionSettings(
        loop(10, 8, 2e-3, 5, clip_norm=None, higher_is_better=False), width=16, depth=1,
        patch_px=16, scores=ScoreSettings(edge_threshold=0.1, edge_tolerance=2, bootstrap=100,
                                          seed=0))
    metrics, images = run_reconstruction_probe(pixels, splits, geometry,
                                               Lpips("alex", tmp_path), settings, tmp_path / "c")
    assert images.shape == splits["test"].images.shape and images.dtype == np.uint8
    for key in ("lpips", "ssim", "edge_f1", "spatial_iou"):
        lo, hi = metrics[f"{key}_ci95"]
        assert lo <= metrics[key] <= hi


def test_dense_probe_learns_the_oracle(tiny, tmp_path):
    """Long enough to learn: the positive control of the tiny set must be found."""
    splits, geometry, oracle = tiny
    settings = replace(DENSE, fit=replace(DENSE.fit, steps=150, eval_every=50))
    metrics, _ = run_dense_probe(oracle, splits, geometry, settings, tmp_path)
    assert metrics["map50"] > 0.5


def _fit_scripted(scores, keep="best", higher_is_better=True, diverge_at=None, tmp_path=None):
    """fit() on a one-weight model whose validation scores are scripted per evaluation."""
    from vlmprobe.probes.training import Diverged, Evaluation, fit
    seen = []

    def step_loss(model, index, generator, step):
        if step == diverge_at:
            raise Diverged("NaN boxes")
        return (model.weight ** 2).sum()

    def evaluate(model, step, train_loss):
        seen.append(model.weight.detach().clone())
        return Evaluation(scores[len(seen) - 1], {"train_loss": train_loss})

    settings = FitSettings(steps=2 * len(scores), batch_size=2, lr=0.1, eval_every=2, seed=0,
                           threads=1, keep=keep, higher_is_better=higher_is_better)
    fitted = fit(lambda: torch.nn.Linear(1, 1, bias=False), 4, step_loss, evaluate, settings,
                 tmp_path, "test")
    return fitted, seen


def test_fit_keeps_the_best_scored_checkpoint_and_skips_unscored_ones(tmp_path):
    fitted, seen = _fit_scripted([0.2, None, 0.9, 0.5], tmp_path=tmp_path / "a")
    assert (fitted.score, fitted.step) == (0.9, 6)
    assert torch.equal(fitted.model.weight.detach(), seen[2])
    assert fitted.unscored.startswith("step 4") and not fitted.stopped
    lowest, _ = _fit_scripted([0.2, 0.1, 0.3], higher_is_better=False, tmp_path=tmp_path / "b")
    assert (lowest.score, lowest.step) == (0.1, 4)


def test_fit_keep_last_and_a_diverged_step_stop_training(tmp_path):
    last, seen = _fit_scripted([0.9, 0.1], keep="last", tmp_path=tmp_path / "a")
    assert (last.score, last.step) == (0.1, 4)
    assert torch.equal(last.model.weight.detach(), seen[-1])
    stopped, seen = _fit_scripted([0.3, 0.8, 0.9], diverge_at=4, tmp_path=tmp_path / "b")
    assert len(seen) == 2 and (stopped.score, stopped.step) == (0.8, 4)
    assert stopped.stopped == "step 5: NaN boxes"


def test_fit_settings_refuse_an_unknown_schedule_or_checkpoint_rule():
    for bad in ({"schedule": "cosine"}, {"keep": "final"}):
        with pytest.raises(ValueError, match="expected one of"):
            FitSettings(steps=1, batch_size=1, lr=1e-3, eval_every=1, seed=0, threads=1, **bad)
