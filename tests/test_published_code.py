"""Conformance: the code the real InternVL2 and CogVLM2 checkpoints ship, through vlmprobe.

Tiny random checkpoints are built from the published files (reference data, never copied into
the project; found through VLMPROBE_REFERENCE_CODE), saved as safetensors and loaded through a
`source: local` entry, as a team with real weights would, in fp32 and bf16. `vlmprobe doctor`
runs the same checks (vlmprobe.models.doctor).
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import torch

from published_checkpoints import REFERENCE, ROOT, VERSIONS, published_folder
from vlmprobe.models import doctor
from vlmprobe.models.registry import adapter_for, get_entry

if not REFERENCE.is_dir() and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the conformance tests, but the published code is not at "
                       f"{REFERENCE}: set VLMPROBE_REFERENCE_CODE")
if not REFERENCE.is_dir():
    pytest.skip(f"the published remote code is not at {REFERENCE}: set VLMPROBE_REFERENCE_CODE "
                f"to the folder holding internvl2_hub/, internvl_2024/ and cogvlm2/",
                allow_module_level=True)

@pytest.fixture(scope="module", params=list(VERSIONS))
def checkpoint(request, tmp_path_factory):
    """(version, local entry of a tiny checkpoint built from that version's published code)."""
    version = request.param
    tmp = tmp_path_factory.mktemp(version)
    source = published_folder(version, tmp / "published")
    template = get_entry(VERSIONS[version][0])
    return version, doctor.build_tiny_checkpoint(template, source, tmp / "checkpoint")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_point_of_the_published_code(checkpoint, dtype):
    version, entry = checkpoint
    report = doctor.check_checkpoint(entry, dtype, ROOT)
    print(doctor.format_report(report))
    assert not report.load_problem, report.load_problem
    assert [p.point for p in report.points] == list(get_entry(VERSIONS[version][0]).points)
    for point in report.points:
        assert point.finite and point.equals_full_pass, (point.point, point.problem)
        if point.kind == "llm" and entry.points[point.point]["layer"] != -1:
            assert point.equals_reference, point.point
    assert not report.buffers_problem, report.buffers_problem
    assert report.ok, doctor.format_report(report)
    assert len(report.generation) == 2 and all(isinstance(a, str) for a in report.generation)


def test_internvl2_rotary_buffers_are_mended(checkpoint):
    """Without the mend, the reload leaves InternLM2's rotary caches uninitialised: the doctor
    sees it (this is the silent bug of today's main)."""
    version, entry = checkpoint
    if not version.startswith("internvl"):
        pytest.skip("InternLM2 only")
    report = doctor.check_checkpoint(entry, torch.float32, ROOT)
    assert any("rotary" in mend for mend in report.mends)
    assert report.ok


def test_internvl2_without_the_rotary_mend_fails(checkpoint, monkeypatch):
    version, entry = checkpoint
    if version != "internvl2_hub":
        pytest.skip("one version suffices")
    from vlmprobe.models import internvl2

    monkeypatch.setattr(internvl2, "restore_rotary_buffers", lambda model, dtype: 0)
    report = doctor.check_checkpoint(entry, torch.float32, ROOT)
    assert "buffer" in report.buffers_problem
    assert not report.ok


def test_cogvlm2_runs_on_substitute_kernels_and_says_so(checkpoint):
    version, entry = checkpoint
    if version != "cogvlm2":
        pytest.skip("CogVLM2 only")
    report = doctor.check_checkpoint(entry, torch.float32, ROOT)
    assert any("SDPA" in mend for mend in report.mends)
    assert any("Triton" in mend for mend in report.mends)
    adapter = adapter_for(entry)
    adapter.load(ROOT, torch.device("cpu"))
    assert "published_code_mends" in adapter.weights_provenance(ROOT)


def test_cogvlm2_substitutes_equal_the_kernels_maths():
    """SDPA in the (B, L, H, D) layout and the rotary rotation against plain formulas."""
    from vlmprobe.models import cogvlm2_kernels as kernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) * 0.5
    expected = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)
    assert torch.allclose(kernels.memory_efficient_attention(q, k, v, scale=0.5), expected,
                          atol=1e-6)
    x = torch.randn(2, 3, 5, 8, generator=g)  # (B, H, L, D)
    angles = torch.rand(2, 5, 4, generator=g)
    out = kernels.apply_rotary_emb(x.clone(), angles.cos(), angles.sin(), inplace=True)
    x0, x1 = x[..., :4], x[..., 4:]
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    assert torch.allclose(out, torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], -1), atol=1e-6)


def published_dynamic_preprocess():
    """`dynamic_preprocess` from the published InternVL file, without its training imports."""
    tree = ast.parse((REFERENCE / "internvl_dynamic_preprocess_dataset.py").read_text())
    wanted = {"find_closest_aspect_ratio", "dynamic_preprocess"}
    functions = [node for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name in wanted]
    namespace: dict = {}
    exec(compile(ast.Module(body=functions, type_ignores=[]), "published", "exec"), namespace)
    return namespace["dynamic_preprocess"]


@pytest.mark.parametrize("size", [(224, 224), (448, 896), (480, 640), (640, 480), (1000, 300),
                                  (300, 1000), (448, 1344), (900, 1600)])
def test_internvl2_tiling_equals_the_published_dynamic_preprocess(size):
    from PIL import Image

    from vlmprobe.models.internvl2 import InternVL2Adapter

    adapter = InternVL2Adapter(get_entry("internvl2"))
    adapter.tile, adapter.max_tiles, adapter.use_thumbnail = 448, 12, True
    h, w = size
    tiles = published_dynamic_preprocess()(Image.new("RGB", (w, h)), min_num=1, max_num=12,
                                           image_size=448, use_thumbnail=True)
    rows, cols = adapter.tiles(size)
    assert adapter.n_tiles(size) == len(tiles)
    assert rows * cols == len(tiles) - (1 if len(tiles) > 1 else 0)


def test_doctor_cli_on_published_code(tmp_path, capsys):
    from vlmprobe.cli import main

    source = published_folder("cogvlm2", tmp_path / "published")
    status = main(["doctor", "cogvlm2", "--local", str(source), "--dtype", "float32"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "| C1 | vision |" in out and "OK in" in out


def test_doctor_fails_with_non_zero_status(tmp_path, capsys, monkeypatch):
    from vlmprobe.cli import main
    from vlmprobe.models import internvl2

    monkeypatch.setattr(internvl2, "restore_rotary_buffers", lambda model, dtype: 0)
    source = published_folder("internvl2_hub", tmp_path / "published")
    status = main(["doctor", "internvl2", "--local", str(source), "--dtype", "float32"])
    assert status == 1
    assert "FAILED" in capsys.readouterr().out


def test_sample_images_are_deterministic():
    assert np.array_equal(doctor.sample_images(), doctor.sample_images())


def test_doctor_refuses_a_full_size_model_it_cannot_shrink(capsys):
    from vlmprobe.cli import main

    status = main(["doctor", "qwen2_5_vl_random", "--dtype", "float32"])
    assert status == 2
    assert "qwen2_5_vl_tiny" in capsys.readouterr().err
