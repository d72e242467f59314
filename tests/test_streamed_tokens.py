"""Inputs read a batch of images at a time: the feature store's reader against the safetensors
library, the lazy controls against their whole-array forms, the statistics accumulated over
chunks against numpy's on the whole array, and a split's images and masks decoded on demand."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmprobe.data.dataset import load_all_images
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.errors import CorruptInput
from vlmprobe.extract.store import FeatureStore, shard_path, write_manifest, write_shard
from vlmprobe.extract.tokens import ArrayTokens, every_row
from vlmprobe.probes.controls import OracleTokens, ShuffledTokens, oracle_tokens, shuffled_tokens
from vlmprobe.probes.ridge import fit_ridge_path, fit_ridge_stream, fit_ridge_streams
from vlmprobe.probes.training import Standardizer, device_tokens


def make_store(root, n=10, shard_size=4, t=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    features = torch.from_numpy(rng.standard_normal((n, t, d)).astype(np.float32))
    ids = [100 + 7 * i for i in range(n)]  # not 0..n-1: rows are found by id
    names = []
    for k, start in enumerate(range(0, n, shard_size)):
        rows = slice(start, start + shard_size)
        write_shard(root, "p", k, features[rows], ids[rows])
        names.append(shard_path(root, "p", k).name)
    write_manifest(root, {"image_ids": ids, "points": {"p": {"shards": names}}})
    return FeatureStore.open(root), ids


def test_stored_rows_are_the_shards_bytes_in_any_order(tmp_path):
    store, ids = make_store(tmp_path)
    reference = torch.cat([load_file(str(shard_path(tmp_path, "p", k)))["features"]
                           for k in range(3)]).float().numpy()
    wanted = [ids[9], ids[2], ids[3], ids[4], ids[0]]  # across shards, one run of three
    tokens = store.tokens("p", wanted)
    assert tokens.shape == (5, 6, 5)
    np.testing.assert_array_equal(tokens.rows(np.arange(5)), reference[[9, 2, 3, 4, 0]])
    np.testing.assert_array_equal(tokens.rows(np.array([4, 1])), reference[[0, 2]])
    np.testing.assert_array_equal(store.load("p"), reference)


def test_unknown_image_and_truncated_shard_are_named(tmp_path):
    store, ids = make_store(tmp_path)
    with pytest.raises(KeyError, match="not in the feature store"):
        store.tokens("p", [ids[0], 5])
    path = shard_path(tmp_path, "p", 2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptInput, match=r"shard-00002.*Fix: delete the feature store"):
        store.tokens("p")
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(CorruptInput, match="header"):
        store.tokens("p")


def test_lazy_controls_do_not_depend_on_which_images_are_read_together():
    rng = np.random.default_rng(1)
    coverage = rng.random((9, 12, 3)).astype(np.float32)
    oracle = OracleTokens(coverage, 16, 0.1, seed=3, stream=1)
    whole = oracle_tokens(coverage, 16, 0.1, seed=3, stream=1)
    np.testing.assert_array_equal(oracle.rows(np.array([7, 2])), whole[[7, 2]])
    shuffled = ShuffledTokens(oracle, seed=3, stream=1)
    some = shuffled.rows(np.array([5, 0]))
    np.testing.assert_array_equal(some, every_row(shuffled)[[5, 0]])
    for row, image in zip(some, (5, 0), strict=True):  # a permutation of that image's tokens
        assert not np.array_equal(row, whole[image])
        np.testing.assert_array_equal(np.sort(row, axis=0), np.sort(whole[image], axis=0))
    # The permutation is not drawn from the oracle noise's bits.
    assert not np.array_equal(shuffled_tokens(whole, 3, 1), whole)
    other = shuffled_tokens(oracle_tokens(coverage, 16, 0.1, seed=3, stream=2), 3, 2)
    assert not np.array_equal(other, shuffled_tokens(whole, 3, 1))


def test_statistics_over_chunks_match_the_whole_array(monkeypatch):
    import vlmprobe.probes.training as training

    monkeypatch.setattr(training, "STATS_ELEMENTS", 60)  # several chunks of images
    x = (np.random.default_rng(2).standard_normal((11, 6, 5)) * 3 + 1).astype(np.float32)
    standardize = Standardizer(ArrayTokens(x))
    flat = x.reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(standardize.mean, flat.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(standardize.std, flat.std(axis=0), rtol=1e-6)
    batches = device_tokens(x, standardize, torch.device("cpu"))
    assert batches.resident is None  # on the CPU: read a batch at a time
    batch = batches.batch(torch.tensor([3, 8]))
    np.testing.assert_array_equal(batch.numpy(), standardize(x[[3, 8]]).numpy())


def test_ridge_over_chunks_matches_one_pass():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 7))
    y = x @ rng.standard_normal((7, 3)) + 0.1 * rng.standard_normal((500, 3))
    whole = fit_ridge_path(x, y, [0.01, 1.0], chunk=10_000)
    pieces = fit_ridge_stream(lambda: ((x[s : s + 37], y[s : s + 37]) for s in range(0, 500, 37)),
                              [0.01, 1.0])
    for alpha in (0.01, 1.0):
        np.testing.assert_allclose(pieces[alpha].weight, whole[alpha].weight, rtol=1e-10)
        np.testing.assert_allclose(pieces[alpha].bias, whole[alpha].bias, atol=1e-12)


def test_ridge_problems_sharing_one_stream_match_each_fit_alone():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 6))
    y = x @ rng.standard_normal((6, 2))
    rows = x[:, 0] > 0  # the second problem sees a subset of the rows, as the box edges do
    both = fit_ridge_streams(
        lambda: (((x[s : s + 50], y[s : s + 50]), (x[s : s + 50][rows[s : s + 50]],
                                                  y[s : s + 50][rows[s : s + 50], :1]))
                 for s in range(0, 400, 50)), [0.1])
    alone = [fit_ridge_path(x, y, [0.1], chunk=50), fit_ridge_path(x[rows], y[rows, :1], [0.1])]
    for fitted, reference in zip(both, alone, strict=True):
        np.testing.assert_allclose(fitted[0.1].weight, reference[0.1].weight, rtol=1e-10)
        np.testing.assert_allclose(fitted[0.1].bias, reference[0.1].bias, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ridge_summed_on_the_gpu_matches_the_host():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    y = rng.standard_normal((300, 2)).astype(np.float32)
    pairs = lambda: (((x[s : s + 64], y[s : s + 64]),) for s in range(0, 300, 64))  # noqa: E731
    (host,) = fit_ridge_streams(pairs, [0.1])
    (gpu,) = fit_ridge_streams(pairs, [0.1], torch.device("cuda"))
    np.testing.assert_allclose(gpu[0.1].weight, host[0.1].weight, rtol=1e-9)
    np.testing.assert_allclose(gpu[0.1].bias, host[0.1].bias, atol=1e-12)


def test_split_images_and_masks_decode_on_demand_within_the_cache(tmp_path, monkeypatch):
    import vlmprobe.data.dataset as dataset

    generate_shapes(tmp_path, seed=0, image_size=32, n_train=9, n_val=2, n_test=2,
                    min_objects=1, max_objects=3, min_size=6, max_size=12)
    monkeypatch.setattr(dataset, "IMAGE_CACHE_BYTES", 3 * 32 * 32 * 3)  # three images
    monkeypatch.setattr(dataset, "DECODED", dataset.DecodedImages())
    split = dataset.load_split(tmp_path, "train")
    ids, eager = load_all_images(tmp_path)
    expected = eager[[ids.index(i) for i in split.image_ids]]
    images = split.images
    assert images.shape == expected.shape and len(images) == 9
    np.testing.assert_array_equal(images[[8, 0, 3]], expected[[8, 0, 3]])
    np.testing.assert_array_equal(images[2:5], expected[2:5])
    np.testing.assert_array_equal(images[-1], expected[-1])
    np.testing.assert_array_equal(np.asarray(images), expected)
    assert len(dataset.DECODED.images) == 3  # no more than the cache holds, however much read
    with pytest.raises(ValueError):
        images[0][0, 0] = 1  # a cached image is shared: read-only
    masks = split.masks
    assert len(masks) == 9 and len(masks[3:5]) == 2
    for image_masks, boxes in zip(masks, split.boxes, strict=True):
        assert image_masks.shape == (len(boxes), 32, 32) and image_masks.dtype == bool
        for mask, (x0, y0, x1, y1) in zip(image_masks, boxes, strict=True):  # inside its box
            rows, cols = np.nonzero(mask)
            assert x0 <= cols.min() and cols.max() < x1 and y0 <= rows.min() and rows.max() < y1

    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(images.paths[4])  # another size
    with pytest.raises(dataset.DatasetError, match="dvc repro --force data"):
        dataset.load_split(tmp_path, "train").images[4]


def test_the_image_cache_tells_apart_two_datasets_at_one_relative_path(tmp_path, monkeypatch):
    """One process (a test worker, a notebook) reading two working directories' data/ by the
    same relative paths, or a dataset written again in place, reads each file's own pixels."""
    import vlmprobe.data.dataset as dataset

    monkeypatch.setattr(dataset, "DECODED", dataset.DecodedImages())
    for size, name in ((32, "a"), (48, "b")):
        generate_shapes(tmp_path / name, seed=0, image_size=size, n_train=3, n_val=1, n_test=1,
                        min_objects=1, max_objects=2, min_size=6, max_size=12)
    for size, name in ((32, "a"), (48, "b")):
        monkeypatch.chdir(tmp_path / name)
        images = dataset.load_split(Path("."), "train").images
        assert images[:].shape == (3, size, size, 3)
    monkeypatch.chdir(tmp_path / "a")
    path = dataset.load_split(Path("."), "train").images.paths[1]
    rewritten = np.full((32, 32, 3), 7, np.uint8)
    Image.fromarray(rewritten).save(path)
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)  # a new mtime even on a coarse clock
    np.testing.assert_array_equal(dataset.load_split(Path("."), "train").images[1], rewritten)
