"""The published InternVL2 and CogVLM2 code on a GPU: bf16 on CUDA, every point and a generation.

For each published code version (tests/published_checkpoints.py) a tiny random checkpoint is
built and checked by `vlmprobe doctor`'s machinery on CUDA in bf16. For CogVLM2, vlmprobe's
substitutes (SDPA for xformers' memory_efficient_attention, a torch rotary for the Triton
kernel) are compared with the real kernels where they run: kernel against kernel on random
tensors, and the model's features with the real kernels against the same model on the
substitutes. Prints a JSON record (and writes it to --out).

    python benchmarks/published_code_gpu.py --out published_code_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from published_checkpoints import VERSIONS, published_folder  # noqa: E402
from vlmprobe.extract.engine import extract_points  # noqa: E402
from vlmprobe.models import cogvlm2_kernels, doctor  # noqa: E402
from vlmprobe.models.registry import adapter_for, get_entry  # noqa: E402


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def kernel_comparison(util: types.ModuleType, device: torch.device) -> dict:
    """The substitutes against the real kernels on random bf16 tensors."""
    g = torch.Generator(device=device).manual_seed(0)
    record: dict = {}
    x = torch.randn(2, 4, 64, 32, device=device, dtype=torch.bfloat16, generator=g)
    angles = torch.rand(2, 64, 16, device=device, generator=g)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    real = util.apply_rotary_emb(x.clone(), cos, sin, interleaved=False, inplace=True)
    ours = cogvlm2_kernels.apply_rotary_emb(x.clone(), cos, sin, inplace=True)
    record["rotary_triton_vs_torch_max_abs_diff_bf16"] = max_difference(real, ours)
    if cogvlm2_kernels.xformers_works(device):
        import xformers.ops as xops

        q, k, v = (torch.randn(2, 65, 16, 64, device=device, dtype=torch.bfloat16,
                               generator=g) for _ in range(3))
        record["attention_xformers_vs_sdpa_max_abs_diff_bf16"] = max_difference(
            xops.memory_efficient_attention(q, k, v, scale=0.125),
            cogvlm2_kernels.memory_efficient_attention(q, k, v, scale=0.125))
    else:
        record["attention_xformers_vs_sdpa_max_abs_diff_bf16"] = "xformers does not run here"
    return record


def cogvlm2_features_real_vs_substitutes(entry, device: torch.device) -> dict:
    adapter = adapter_for(entry)
    model = adapter.load(ROOT, device, dtype=torch.bfloat16)
    images = doctor.sample_images()
    points = list(entry.points)
    real = extract_points(adapter, model, images, points, device)
    mends_real = list(adapter.mends)
    visual = sys.modules[type(model.model.vision.transformer.layers[0].attention).__module__]
    util = sys.modules[type(model.model.layers[0].self_attn.rotary_emb).__module__]
    kept = visual.xops, util.apply_rotary_emb_func
    visual.xops = types.SimpleNamespace(
        memory_efficient_attention=cogvlm2_kernels.memory_efficient_attention)
    util.apply_rotary_emb_func = cogvlm2_kernels.apply_rotary_emb
    substituted = extract_points(adapter, model, images, points, device)
    visual.xops, util.apply_rotary_emb_func = kept
    return {
        "kernels_of_the_real_run": mends_real or "real xformers and Triton kernels",
        "kernels": kernel_comparison(util, device),
        "features_max_abs_diff_real_vs_substitutes_bf16": {
            p: max_difference(real[p], substituted[p]) for p in points},
        "features_mean_abs_bf16": {p: float(real[p].abs().mean()) for p in points},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    record: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for version, (template_name, _, _) in VERSIONS.items():
            source = published_folder(version, Path(tmp) / version / "published")
            entry = doctor.build_tiny_checkpoint(get_entry(template_name), source,
                                                 Path(tmp) / version / "checkpoint")
            report = doctor.check_checkpoint(entry, torch.bfloat16, ROOT, device=device)
            print(doctor.format_report(report), flush=True)
            record[version] = {"ok": report.ok, "table": doctor.format_report(report)}
            if version == "cogvlm2":
                record[version].update(cogvlm2_features_real_vs_substitutes(entry, device))
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
