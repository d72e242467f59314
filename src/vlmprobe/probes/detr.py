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

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss
from tqdm import tqdm

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry
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
from vlmprobe.probes.training import (
    Curves,
    Standardizer,
    batches,
    deterministic_torch,
    mirror_permutation,
    token_centres,
    warmup_cosine,
)

# Matching costs and loss weights (class, L1, GIoU) as in Deformable DETR.
W_CLASS, W_L1, W_GIOU = 2.0, 5.0, 2.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
MAX_CYCLES = 32.0  # the finest positional code: half a cycle per token of a 64-wide grid
INITIAL_BOX_SIZE = 0.2  # reference boxes start at a fifth of the image, about an object's size


@dataclass(frozen=True)
class DetrSettings:
    steps: int
    batch_size: int
    lr: float
    width: int
    layers: int
    queries: int
    heads: int
    flip: bool
    eval_every: int
    threads: int
    seed: int
    bootstrap: int


def sine_encoding(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., 2) positions in [0, 1] -> (..., dim) sines and cosines, dim / 2 per coordinate.

    Frequencies run geometrically from 1 to MAX_CYCLES cycles per image side, so neighbouring
    tokens (1/16 of the side apart on a 16x16 grid) get clearly different codes.
    """
    n = dim // 4
    freqs = MAX_CYCLES ** (torch.arange(n, dtype=torch.float32) / max(n - 1, 1))
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
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    # A diverged head: scipy would fail on the NaN costs with no word of why.
    require_finite_predictions("DETR head outputs in training",
                               {"class logits": [logits], "boxes": [boxes]})
    xyxy = cxcywh_to_xyxy(boxes)
    cost = (
        W_CLASS * focal_costs(logits)[:, target.classes]
        + W_L1 * torch.cdist(xyxy, target.boxes, p=1)
        - W_GIOU * generalized_box_iou(xyxy, target.boxes)
    )
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


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
def predict(model: DetrProbe, tokens: torch.Tensor, token_pos: torch.Tensor,
            image_size: tuple[int, int], ids: list[int], batch_size: int = 64) -> list[Detections]:
    """Every (query, class) pair is a detection scored by its class probability."""
    model.eval()
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out = []
    for s in range(0, len(tokens), batch_size):
        logits, boxes = model(tokens[s : s + batch_size], token_pos)[-1]
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
    features: dict[str, np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    settings: DetrSettings,
    curves_dir: Path,
) -> tuple[dict, list[Detections]]:
    """Train on train, pick the checkpoint by val mAP@0.5, report test `map50`, `map` (+ CIs).

    Returns the metrics and the test detections (for figures). A head whose detections are
    not finite is an error of this probe: its checkpoints are never selected, and if no
    checkpoint or the test detections are not finite, the metrics are only `detr_invalid`
    (the reason) and the detections empty.
    """
    ids = class_ids(splits["train"])
    standardize = Standardizer(features["train"])
    x = {name: standardize(f) for name, f in features.items()}
    targets = split_targets(splits["train"])
    mirror = mirror_permutation(geometry) if settings.flip else None
    with deterministic_torch(settings.seed, settings.threads) as generator:
        model = DetrProbe(x["train"].shape[-1], len(ids), settings)
        token_pos = sine_encoding(torch.from_numpy(token_centres(geometry)).float(), settings.width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, settings.steps, settings.steps // 20)
        )
        curves = Curves(curves_dir)
        best = (-1.0, None, 0)  # (val map50, state, step)
        running = 0.0
        diverged = ""  # why the last checkpoint that could not be scored was not
        stopped = ""  # why training stopped early, if it did
        progress = tqdm(
            enumerate(batches(len(targets), settings.batch_size, settings.steps, generator)),
            total=settings.steps, desc="detr", unit="step", mininterval=5,
        )
        for step, index in progress:
            tokens = x["train"][index]
            batch_targets = [targets[i] for i in index.tolist()]
            if mirror is not None:
                flip = torch.rand(len(index), generator=generator) < 0.5
                tokens = torch.where(flip[:, None, None], tokens[:, mirror], tokens)
                batch_targets = [mirror_targets(t) if f else t
                                 for t, f in zip(batch_targets, flip.tolist(), strict=True)]
            try:
                loss = sum(set_loss(logits, boxes, batch_targets)
                           for logits, boxes in model(tokens, token_pos))
            except NonFiniteDetections as e:  # diverged: the best earlier checkpoint stands
                diverged = stopped = f"step {step + 1}: {e}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running += loss.item()
            if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
                found = predict(model, x["val"], token_pos, geometry.image_size, ids)
                try:
                    val = map50(splits["val"], found)
                except NonFiniteDetections as e:
                    val, diverged = None, f"step {step + 1}: {e}"
                curves.log(step + 1, **curve_values(
                    train_loss=running / settings.eval_every, val_map50=val))
                running = 0.0
                if val is not None and val > best[0]:
                    best = (val, copy.deepcopy(model.state_dict()), step + 1)
        curves.close()
        if best[1] is None:
            return (invalid_result("detr", f"no checkpoint gave finite validation detections; "
                                           f"the last, {diverged}"),
                    no_detections(len(x["test"])))
        model.load_state_dict(best[1])
        test_found = predict(model, x["test"], token_pos, geometry.image_size, ids)
    try:
        metrics = detection_scores(
            splits["test"], test_found, "", settings.bootstrap, settings.seed
        )
    except NonFiniteDetections as e:
        return invalid_result("detr", str(e)), no_detections(len(test_found))
    metrics["val_map50"] = best[0]
    metrics["detr_selected_step"] = best[2]
    if stopped:
        metrics["detr_stopped"] = f"training stopped when the head diverged at {stopped}"
    return metrics, test_found
