"""Tiny test fixture for vlmprobe: a model with CogVLM2's published remote-code layout.

Written from the layout alone (module names and data flow), not from the published code:
`model.vision` (EVA2-CLIP: `patch_embedding`, `transformer.layers[i]`, CLS dropped, a 2x2
stride-2 `conv`, a GLU `linear_proj`, `boi`/`eoi`), `model.layers[k]` with vision and language
experts (`self_attn.{vision,language}_expert_query_key_value`, `mlp.{vision,language}_mlp`),
returning a tuple. Vision tokens are where `token_type_ids == 1`: boi, the patches row-major,
eoi; the patches between boi and eoi share one position id.

Generation has the published API's shape: `build_conversation_input_ids(tokenizer, query=...,
history=[], images=[image], template_version="chat")` makes one sample's inputs (the image
resized and normalised as EVA2-CLIP expects, vision slots held by pad ids); `generate` returns
the prompt followed by the new tokens. Decoding is greedy and recomputes the whole sequence each
step (no KV cache): enough for tiny test models.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_cogvlm import CogVLMConfig

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = {"base": "{}", "chat": "Question: {} Answer:", "vqa": "Question: {} Short answer:"}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x * scale).to(x.dtype)


class PatchEmbedding(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.proj = nn.Conv2d(3, v["hidden_size"], v["patch_size"], stride=v["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, v["hidden_size"]))
        n = (v["image_size"] // v["patch_size"]) ** 2
        self.position_embedding = nn.Embedding(n + 1, v["hidden_size"])

    def forward(self, images):
        x = self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.heads = v["num_heads"]
        self.query_key_value = nn.Linear(v["hidden_size"], 3 * v["hidden_size"])
        self.dense = nn.Linear(v["hidden_size"], v["hidden_size"])

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.query_key_value(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.dense(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.fc1 = nn.Linear(v["hidden_size"], v["intermediate_size"])
        self.fc2 = nn.Linear(v["intermediate_size"], v["hidden_size"])

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Post-norm residual blocks: x + norm(attn(x)), then x + norm(mlp(x))."""

    def __init__(self, v):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(v["hidden_size"], eps=v["layer_norm_eps"])
        self.attention = VisionAttention(v)
        self.mlp = VisionMLP(v)
        self.post_attention_layernorm = nn.LayerNorm(v["hidden_size"], eps=v["layer_norm_eps"])

    def forward(self, x):
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(v) for _ in range(v["num_hidden_layers"])])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    def __init__(self, config, in_features):
        super().__init__()
        d = config.hidden_size
        self.linear_proj = nn.Linear(in_features, d, bias=False)
        self.norm1 = nn.LayerNorm(d)
        self.dense_h_to_4h = nn.Linear(d, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x):
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        v = config.vision_config
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = Transformer(v)
        self.conv = nn.Conv2d(v["hidden_size"], v["hidden_size"], kernel_size=2, stride=2)
        self.linear_proj = GLU(config, in_features=v["hidden_size"])
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images):
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        b, n, d = x.shape
        side = int(n**0.5)
        x = self.conv(x.transpose(1, 2).reshape(b, d, side, side)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        return torch.cat([self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)], dim=1)


def rotary(x, positions, theta):
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def expert_mask(token_type_ids):
    """Vision-expert tokens: a vision token followed by another (so eoi, the last of the image
    slots, goes to the language expert, as in the published code)."""
    vision = token_type_ids == VISION_TOKEN_TYPE
    return vision & F.pad(vision[:, 1:], (0, 1), value=False)


def by_expert(vision_mask, x, vision_fn, language_fn):
    """Each expert runs on its own tokens only."""
    vision_out, language_out = vision_fn(x[vision_mask]), language_fn(x[~vision_mask])
    out = vision_out.new_empty((*x.shape[:-1], vision_out.shape[-1]))
    out[vision_mask], out[~vision_mask] = vision_out, language_out
    return out


class VisionExpertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_multi_query_heads
        self.head_dim = config.hidden_size // self.heads
        self.theta = config.rope_theta
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.vision_expert_query_key_value = nn.Linear(config.hidden_size, width, bias=True)
        self.vision_expert_dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(config.hidden_size, width, bias=False)
        self.language_expert_dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, vision_mask, positions, mask):
        b, s, _ = x.shape
        qkv = by_expert(vision_mask, x, self.vision_expert_query_key_value,
                        self.language_expert_query_key_value)
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        q = q.reshape(b, s, self.heads, -1).transpose(1, 2)
        k = k.reshape(b, s, self.kv_heads, -1).transpose(1, 2)
        v = v.reshape(b, s, self.kv_heads, -1).transpose(1, 2)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return by_expert(vision_mask, out, self.vision_expert_dense, self.language_expert_dense)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, x, vision_mask):
        return by_expert(vision_mask, x, self.vision_mlp, self.language_mlp)


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = VisionExpertAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionExpertMLP(config)

    def forward(self, x, vision_mask, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), vision_mask, positions, mask)
        return (x + self.mlp(self.post_attention_layernorm(x), vision_mask),)


def build_position_ids(token_type_ids):
    """One position per token, except that the tokens strictly between boi and eoi share one."""
    vision = token_type_ids == VISION_TOKEN_TYPE
    previous = F.pad(vision[:, :-1], (1, 0), value=False)
    following = F.pad(vision[:, 1:], (0, 1), value=False)
    interior = vision & previous & following
    repeats = interior & F.pad(interior[:, :-1], (1, 0), value=False)
    return (~repeats).long().cumsum(1) - 1


class CogVLMModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config) for _ in
                                     range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)

    def embed(self, input_ids, images, token_type_ids):
        """Token embeddings with the vision slots holding the image's features."""
        x = self.embed_tokens(input_ids)
        if images is not None:
            pixels = torch.stack([per_sample[0] for per_sample in images])
            features = self.vision(pixels).to(x.dtype)
            vision_mask = token_type_ids == VISION_TOKEN_TYPE
            x = x.masked_scatter(vision_mask[..., None], features.reshape(-1, x.shape[-1]))
        return x

    def forward(self, input_ids, images, token_type_ids, attention_mask, output_hidden_states,
                inputs_embeds=None):
        x = inputs_embeds if inputs_embeds is not None else self.embed(input_ids, images,
                                                                       token_type_ids)
        vision_mask = expert_mask(token_type_ids)
        positions = build_position_ids(token_type_ids)
        keep = attention_mask.bool()
        s = x.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        # Every token sees itself: a left-pad row that saw nothing would turn to NaN.
        itself = torch.eye(s, dtype=torch.bool, device=x.device)
        mask = (causal[None] & (keep[:, None, :] | itself))[:, None]
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, vision_mask, positions, mask)[0]
            hidden_states.append(x)
        hidden_states[-1] = x = self.norm(x)
        return x, tuple(hidden_states) if output_hidden_states else None


class CogVLMForCausalLM(PreTrainedModel):
    config_class = CogVLMConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, images=None, token_type_ids=None, attention_mask=None,
                output_hidden_states=False, **kwargs):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x, hidden_states = self.model(input_ids, images, token_type_ids, attention_mask,
                                      output_hidden_states)
        return CausalLMOutputWithPast(logits=self.lm_head(x), hidden_states=hidden_states)

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None,
                                     template_version=None):
        """One sample's inputs: bos, the image's vision slots (if any), then the prompt."""
        if history:
            raise ValueError("this fixture answers single-turn queries only: pass history=[]")
        text = TEMPLATES[template_version or "chat"].format(query)
        ids = [tokenizer.bos_token_id]
        types = [LANGUAGE_TOKEN_TYPE]
        pixels = []
        if images:
            if len(images) != 1:
                raise ValueError(f"one image per conversation; got {len(images)}")
            pixels = [self.transform(images[0])]
            v = self.config.vision_config
            slots = (v["image_size"] // v["patch_size"] // 2) ** 2 + 2  # boi, patches, eoi
            ids += [tokenizer.pad_token_id] * slots
            types += [VISION_TOKEN_TYPE] * slots
        words = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {
            "input_ids": torch.tensor(ids + words),
            "token_type_ids": torch.tensor(types + [LANGUAGE_TOKEN_TYPE] * len(words)),
            "attention_mask": torch.ones(len(ids) + len(words), dtype=torch.long),
            "images": pixels,
        }

    def transform(self, image):
        """An RGB image (PIL or HxWx3 uint8) -> (3, S, S), resized and normalised."""
        x = torch.from_numpy(np.asarray(image.convert("RGB") if hasattr(image, "convert")
                                        else image).copy()).permute(2, 0, 1).float() / 255.0
        size = self.config.vision_config["image_size"]
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True)[0]
        return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]

    @torch.no_grad()
    def generate(self, input_ids, images=None, token_type_ids=None, attention_mask=None,
                 max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=None,
                 **kwargs):
        if do_sample:
            raise ValueError("this fixture decodes greedily only: pass do_sample=False")
        eos = getattr(self.config, "eos_token_id", None) if eos_token_id is None else eos_token_id
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        ids = input_ids
        x = self.model.embed(ids, images, types)  # the image is encoded once
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            hidden, _ = self.model(ids, None, types, mask, False, inputs_embeds=x)
            token = self.lm_head(hidden[:, -1]).argmax(-1)
            if eos is not None:
                token = torch.where(done, torch.full_like(token, eos), token)
                done |= token == eos
            ids = torch.cat([ids, token[:, None]], dim=1)
            x = torch.cat([x, self.model.embed_tokens(token)[:, None]], dim=1)
            types = torch.cat([types, torch.full_like(types[:, :1], LANGUAGE_TOKEN_TYPE)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if bool(done.all()):
                break
        return ids
