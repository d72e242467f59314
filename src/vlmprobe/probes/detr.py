"""The DETR-style detection probe (the plan's): learned object queries cross-attend to the
frozen tokens.

Capacity: an MLP projects each (standardised) token to `width` dims; `layers` decoder layers
(self-attention among the queries, cross-attention to the tokens, a 4x-wide feed-forward block,
post-norm) refine `queries` learned queries. Each token's centre (from the token geometry) gets a
fixed 2-D sine encoding, added linearly to the projected token before the shared key/value
projection and again to the keys; each query carries a learned reference box, initialised on a
grid over the image, whose centre's sine encoding (through an MLP) is its positional query.
Every layer predicts sigmoid class scores and a box as a correction to its reference box, which
the next layer starts from (iterative refinement). Training matches queries to objects per image
with the Hungarian algorithm on focal class cost + L1 + GIoU, with the same losses at every
layer (auxiliary losses), AdamW with warm-up and cosine decay, and horizontal flips of the token
grid. The checkpoint with the best validation mAP@0.5 among periodic evaluations is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import Tokens
from vlmprobe.probes.detection import (
    Detections,
    NonFiniteDetections,
    Targets,
    class_ids,
    curve_values,
    detection_scores,
    invalid_result,
    map50,
    mirror_targets,
    no_detections,
    require_finite_predictions,
    split_targets,
)
from vlmprobe.probes.registry import ProbeResult, TokenSet
from vlmprobe.probes.training import (
    DeviceBatches,
    Diverged,
    Evaluation,
    FitSettings,
    Standardizer,
    deterministic_torch,
    device_tokens,
    fit,
    mirror_permutation,
    mirrored,
    token_centres,
)

# Matching costs and loss weights (class, L1, GIoU) as in Deformable DETR.
W_CLASS, W_L1, W_GIOU = 2.0, 5.0, 2.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
MAX_CYCLES = 32.0  # the finest positional code: half a cycle per token of a 64-wide grid
INITIAL_BOX_SIZE = 0.2  # reference boxes start at a fifth of the image, about an object's size


@dataclass(frozen=True)
class DetrSettings:
    fit: FitSettings
    width: int
    layers: int
    queries: int
    heads: int
    flip: bool
    bootstrap: int


def sine_encoding(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., 2) positions in [0, 1] -> (..., dim) sines and cosines, dim / 2 per coordinate.

    Frequencies run geometrically from 1 to MAX_CYCLES cycles per image side, so neighbouring
    tokens (1/16 of the side apart on a 16x16 grid) get clearly different codes.
    """
    n = dim // 4
    steps = torch.arange(n, dtype=torch.float32, device=xy.device)
    freqs = MAX_CYCLES ** (steps / max(n - 1, 1))
    angles = xy[..., None] * 2 * math.pi * freqs  # (..., 2, n)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def grid_reference_boxes(queries: int) -> torch.Tensor:
    """(Q, 4) cxcywh reference boxes with centres on the most nearly square grid."""
    cols = math.ceil(math.sqrt(queries))
    rows = math.ceil(queries / cols)
    k = torch.arange(queries)
    cx = ((k % cols).float() + 0.5) / cols
    cy = ((k // cols).float() + 0.5) / rows
    size = torch.full((queries,), INITIAL_BOX_SIZE)
    return torch.stack([cx, cy, size, size], dim=1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, W) -> (B, heads, N, W / heads)."""
    b, n, w = x.shape
    return x.reshape(b, n, heads, w // heads).transpose(1, 2)


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the tokens, feed-forward (post-norm).

    The tokens' keys and values are projected once, shared by every layer: the token
    projection dominates the cost on CPU, and each layer still has its own query projection.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_query = nn.Linear(width, width)
        self.cross_out = nn.Linear(width, width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))

    def forward(self, q, q_pos, keys, values):
        x = q + q_pos
        q = self.norms[0](q + self.self_attn(x, x, q, need_weights=False)[0])
        attended = F.scaled_dot_product_attention(
            split_heads(self.cross_query(q + q_pos), self.heads), keys, values
        )
        attended = attended.transpose(1, 2).reshape(q.shape)
        q = self.norms[1](q + self.cross_out(attended))
        return self.norms[2](q + self.ffn(q))


class DetrProbe(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, s: DetrSettings):
        super().__init__()
        w = s.width
        self.width = w
        self.heads = s.heads
        self.project = nn.Sequential(nn.Linear(in_dim, w), nn.GELU(), nn.Linear(w, w))
        self.memory_pos = nn.Linear(w, w)
        self.memory_kv = nn.Linear(w, 2 * w)
        self.content = nn.Embedding(s.queries, w)
        self.reference = nn.Parameter(inverse_sigmoid(grid_reference_boxes(s.queries)))
        self.query_pos = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w))
        self.layers = nn.ModuleList(DecoderLayer(w, s.heads) for _ in range(s.layers))
        self.classify = nn.Linear(w, n_classes)
        self.box = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, 4))
        nn.init.constant_(self.classify.bias, -math.log(99.0))  # start at p = 0.01
        nn.init.zeros_(self.box[-1].weight)
        nn.init.zeros_(self.box[-1].bias)

    def forward(self, tokens: torch.Tensor, token_pos: torch.Tensor):
        """tokens (B, T, D), token_pos (T, width) -> per layer (logits (B, Q, C), boxes cxcywh)."""
        # Positions join the token content before the key/value projection, so what a query
        # reads (the values) says where it was read; tokens without position in their content
        # (the oracle control) could otherwise only be found, not located.
        memory = self.project(tokens) + self.memory_pos(token_pos)
        keys, values = self.memory_kv(memory).chunk(2, dim=-1)
        keys = split_heads(keys + token_pos, self.heads)
        values = split_heads(values, self.heads)
        b = len(tokens)
        q = self.content.weight.expand(b, -1, -1)
        reference = self.reference.sigmoid().expand(b, -1, -1)
        outputs = []
        for layer in self.layers:
            q_pos = self.query_pos(sine_encoding(reference[..., :2], self.width))
            q = layer(q, q_pos, keys, values)
            boxes = (inverse_sigmoid(reference) + self.box(q)).sigmoid()
            outputs.append((self.classify(q), boxes))
            reference = boxes.detach()
        return outputs


def focal_costs(logits: torch.Tensor) -> torch.Tensor:
    """Per (query, class) matching cost of calling the query that class (focal form)."""
    p = logits.sigmoid()
    pos = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * -F.logsigmoid(logits)
    neg = (1 - FOCAL_ALPHA) * p**FOCAL_GAMMA * -F.logsigmoid(-logits)
    return pos - neg


@torch.no_grad()
def hungarian(logits: torch.Tensor, boxes: torch.Tensor, target: Targets):
    """Query and object indices of the minimum-cost matching for one image."""
    if len(target.classes) == 0:
        empty = torch.empty(0, dtype=torch.long, device=logits.device)
        return empty, empty
    # A diverged head: scipy would fail on the NaN costs with no word of why.
    require_finite_predictions("DETR head outputs in training",
                               {"class logits": [logits], "boxes": [boxes]})
    xyxy = cxcywh_to_xyxy(boxes)
    cost = (
        W_CLASS * focal_costs(logits)[:, target.classes]
        + W_L1 * torch.cdist(xyxy, target.boxes, p=1)
        - W_GIOU * generalized_box_iou(xyxy, target.boxes)
    )
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=logits.device),
            torch.as_tensor(cols, dtype=torch.long, device=logits.device))


def set_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[Targets]) -> torch.Tensor:
    """Focal class loss over all queries + L1 and GIoU over matched ones, per object."""
    n_objects = max(sum(len(t.classes) for t in targets), 1)
    class_target = torch.zeros_like(logits)
    matched_pred, matched_gt = [], []
    for i, target in enumerate(targets):
        rows, cols = hungarian(logits[i].detach(), boxes[i].detach(), target)
        class_target[i, rows, target.classes[cols]] = 1.0
        matched_pred.append(cxcywh_to_xyxy(boxes[i, rows]))
        matched_gt.append(target.boxes[cols])
    pred, gt = torch.cat(matched_pred), torch.cat(matched_gt)
    loss_class = sigmoid_focal_loss(
        logits, class_target, FOCAL_ALPHA, FOCAL_GAMMA, reduction="sum"
    ) / n_objects
    loss_l1 = F.l1_loss(pred, gt, reduction="sum") / n_objects
    loss_giou = (1 - torch.diag(generalized_box_iou(pred, gt))).sum() / n_objects
    return W_CLASS * loss_class + W_L1 * loss_l1 + W_GIOU * loss_giou


@torch.no_grad()
def predict(model: DetrProbe, tokens: DeviceBatches, token_pos: torch.Tensor,
            image_size: tuple[int, int], ids: list[int], batch_size: int = 64) -> list[Detections]:
    """Every (query, class) pair is a detection scored by its class probability."""
    model.eval()
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out = []
    for batch in tokens.in_order(batch_size):
        logits, boxes = (o.float().cpu() for o in model(batch, token_pos)[-1])
        probs = logits.sigmoid()
        xyxy = (cxcywh_to_xyxy(boxes) * scale).clamp(min=0)
        for p, b in zip(probs, xyxy, strict=True):
            q, c = p.shape
            out.append(Detections(
                b[:, None, :].expand(q, c, 4).reshape(-1, 4).double().numpy(),
                np.tile(np.asarray(ids), q),
                p.reshape(-1).double().numpy(),
            ))
    model.train()
    return out


def run_detr_probe(
    features: dict[str, Tokens | np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    settings: DetrSettings,
    curves_dir: Path,
) -> tuple[dict, list[Detections]]:
    """Train on train, pick the checkpoint by val mAP@0.5, report test `map50`, `map` (+ CIs).

    Returns the metrics and the test detections (for figures). A head whose detections are
    not finite is an error of this probe: its checkpoints are never selected, and if no
    checkpoint or the test detections are not finite, the metrics are only `invalid`
    (the reason) and the detections empty.
    """
    ids = class_ids(splits["train"])
    device = settings.fit.device
    standardize = Standardizer(features["train"])
    x = {name: device_tokens(f, standardize, device) for name, f in features.items()}
    targets = split_targets(splits["train"])
    mirror = mirror_permutation(geometry) if settings.flip else None
    token_pos = sine_encoding(torch.from_numpy(token_centres(geometry)).float(), settings.width)
    token_pos_on_device = token_pos.to(device)
    mirror_index = None if mirror is None else torch.as_tensor(mirror, device=device)

    def step_loss(model, index, generator, step):
        tokens, flips = mirrored(x["train"].batch(index), generator, mirror_index)
        batch_targets = [mirror_targets(targets[i]) if f else targets[i]
                         for i, f in zip(index.tolist(), flips, strict=True)]
        batch_targets = [t.to(device) for t in batch_targets]
        try:
            return sum(set_loss(logits, boxes, batch_targets)
                       for logits, boxes in model(tokens, token_pos_on_device))
        except NonFiniteDetections as e:  # diverged: the best earlier checkpoint stands
            raise Diverged(str(e)) from e

    def evaluate(model, step, train_loss):
        found = predict(model, x["val"], token_pos_on_device, geometry.image_size, ids)
        try:
            val, why = map50(splits["val"], found), ""
        except NonFiniteDetections as e:
            val, why = None, str(e)
        return Evaluation(val, curve_values(train_loss=train_loss, val_map50=val), why)

    fitted = fit(lambda: DetrProbe(x["train"].shape[-1], len(ids), settings),
                 len(targets), step_loss, evaluate, settings.fit, curves_dir, "detr")
    if fitted.score is None:
        return (invalid_result(f"no checkpoint gave finite validation detections; the last, "
                                f"{fitted.unscored}"),
                no_detections(len(x["test"])))
    fs = settings.fit
    with deterministic_torch(fs.seed, fs.threads, fs.device):
        test_found = predict(fitted.model, x["test"], token_pos_on_device, geometry.image_size,
                             ids)
    try:
        metrics = detection_scores(splits["test"], test_found, settings.bootstrap, fs.seed)
    except NonFiniteDetections as e:
        return invalid_result(str(e)), no_detections(len(test_found))
    metrics["val_map50"] = fitted.score
    metrics["selected_step"] = fitted.step
    if fitted.stopped:
        metrics["stopped"] = f"training stopped when the head diverged at {fitted.stopped}"
    return metrics, test_found


def run(tokens: TokenSet, settings: DetrSettings, curves_dir: Path) -> ProbeResult:
    """The DETR-style probe as the registry runs it (`vlmprobe.probes.registry`)."""
    metrics, found = run_detr_probe(tokens.features, tokens.splits, tokens.geometry, settings,
                                    curves_dir)
    return ProbeResult(metrics, detections=found)
