"""Tiny test fixture for vlmprobe: a model with InternVL2's published remote-code layout.

Written from the layout alone (module names and data flow), not from the published code:
`vision_model` (InternViT: embeddings, encoder.layers[i].{attn.qkv, attn.proj, mlp.fc1,
mlp.fc2, norm1, norm2, ls1, ls2}), `pixel_shuffle()`, `mlp1` (LayerNorm, Linear, GELU, Linear)
and `language_model` (InternLM2: model.layers[k].{attention.wqkv, attention.wo,
feed_forward.w1/w2/w3}). The prompt holds `img_context_token_id` once per image token; the
caller sets that id on the model and passes `image_flags`.

Generation has the published API's shape: `generate(pixel_values, input_ids, attention_mask,
generation_config=None, **kwargs)` returns only the new tokens; `chat` and `batch_chat` take
questions with an `<image>` placeholder, apply a chat format (InternLM2 style, no system
message), and return the decoded answers. Decoding is greedy and recomputes the whole sequence
each step (no KV cache): enough for tiny test models.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from .configuration_internvl_chat import InternVLChatConfig


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        n = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.patch_embedding = nn.Conv2d(3, d, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class InternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class InternMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(d))
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(
            [InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values):
        return BaseModelOutput(last_hidden_state=self.encoder(self.embeddings(pixel_values)))


def rotary(x, positions, theta):
    """Rotate (B, H, S, Dh) by rotary position embeddings of `positions` (B, S)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class InternLM2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.theta = config.rope_theta
        # Grouped packing: per kv head, its query heads then its key and value.
        self.wqkv = nn.Linear(
            config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False
        )
        self.wo = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, positions, mask):
        b, s, _ = x.shape
        group = self.heads // self.kv_heads
        qkv = self.wqkv(x).reshape(b, s, self.kv_heads, group + 2, self.head_dim)
        q = qkv[..., :group, :].reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2).repeat_interleave(group, dim=1)
        v = qkv[..., -1, :].transpose(1, 2).repeat_interleave(group, dim=1)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = InternLM2Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = InternLM2MLP(config)

    def forward(self, x, positions, mask):
        x = x + self.attention(self.attention_norm(x), positions, mask)
        return (x + self.feed_forward(self.ffn_norm(x)),)


class InternLM2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, attention_mask, output_hidden_states=False):
        b, s, _ = inputs_embeds.shape
        keep = attention_mask.bool()
        positions = (keep.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
        # Every token sees itself: a left-pad row that saw nothing would turn to NaN.
        itself = torch.eye(s, dtype=torch.bool, device=keep.device)
        mask = (causal[None] & (keep[:, None, :] | itself))[:, None]
        x, hidden_states = inputs_embeds, [inputs_embeds]
        for layer in self.layers:
            x = layer(x, positions, mask)[0]
            hidden_states.append(x)
        hidden_states[-1] = x = self.norm(x)
        return x, tuple(hidden_states) if output_hidden_states else None


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.tok_embeddings


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "internvl"

    def __init__(self, config):
        super().__init__(config)
        vit = config.vision_config.hidden_size
        llm = config.llm_config.hidden_size
        self.downsample_ratio = config.downsample_ratio
        side = config.force_image_size // config.vision_config.patch_size
        self.num_image_token = int(side * side * config.downsample_ratio**2)
        self.img_context_token_id = None
        self.vision_model = InternVisionModel(config.vision_config)
        self.language_model = InternLM2ForCausalLM(config.llm_config)
        merged = vit * int(1 / config.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged), nn.Linear(merged, llm), nn.GELU(), nn.Linear(llm, llm)
        )
        self.post_init()

    def pixel_shuffle(self, x, scale_factor=0.5):
        """(N, H, W, C) -> (N, H*s, W*s, C/s^2): cell [i, j] concatenates its 2x2 patches,
        row by row."""
        n, h, w, c = x.shape
        r = int(1 / scale_factor)
        x = x.reshape(n, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h // r, w // r, r * r * c)

    def extract_feature(self, pixel_values):
        vit = self.vision_model(pixel_values).last_hidden_state[:, 1:]
        side = int(vit.shape[1] ** 0.5)
        vit = self.pixel_shuffle(vit.reshape(vit.shape[0], side, side, -1), self.downsample_ratio)
        return self.mlp1(vit.reshape(vit.shape[0], -1, vit.shape[-1]))

    def embed_with_images(self, pixel_values, input_ids, image_flags=None):
        """Token embeddings with each image token's slot holding its projected vision feature."""
        if self.img_context_token_id is None:
            raise ValueError("set model.img_context_token_id to the <IMG_CONTEXT> token id")
        embeds = self.language_model.get_input_embeddings()(input_ids)
        vit = self.extract_feature(pixel_values)
        if image_flags is not None:
            vit = vit[image_flags.view(-1) == 1]
        slots = input_ids == self.img_context_token_id
        return embeds.masked_scatter(slots[..., None], vit.reshape(-1, vit.shape[-1]).to(embeds))

    def forward(self, pixel_values, input_ids, attention_mask=None, image_flags=None,
                output_hidden_states=False, **kwargs):
        embeds = self.embed_with_images(pixel_values, input_ids, image_flags)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x, hidden_states = self.language_model.model(embeds, attention_mask, output_hidden_states)
        return CausalLMOutputWithPast(
            logits=self.language_model.output(x), hidden_states=hidden_states
        )

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None,
                 generation_config=None, **kwargs):
        settings = {**(generation_config or {}), **kwargs}
        if settings.get("do_sample"):
            raise ValueError("this fixture decodes greedily only: pass do_sample=False")
        eos = settings.get("eos_token_id")
        embed = self.language_model.get_input_embeddings()
        x = self.embed_with_images(pixel_values, input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        new = []
        for _ in range(settings.get("max_new_tokens", 20)):
            hidden, _ = self.language_model.model(x, mask)
            token = self.language_model.output(hidden[:, -1]).argmax(-1)
            if eos is not None:
                token = torch.where(done, torch.full_like(token, eos), token)
                done |= token == eos
            new.append(token)
            x = torch.cat([x, embed(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if bool(done.all()):
                break
        return torch.stack(new, dim=1)

    def chat(self, tokenizer, pixel_values, question, generation_config, num_patches_list=None,
             **kwargs):
        if num_patches_list is None:
            num_patches_list = [len(pixel_values)]
        return self.batch_chat(tokenizer, pixel_values, [question], generation_config,
                               num_patches_list=num_patches_list, **kwargs)[0]

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config,
                   num_patches_list=None, IMG_START_TOKEN="<img>", IMG_END_TOKEN="</img>",
                   IMG_CONTEXT_TOKEN="<IMG_CONTEXT>", **kwargs):
        """One answer per question; question i's `<image>` stands for num_patches_list[i] tiles
        of `pixel_values`, taken in order."""
        if num_patches_list is None:
            num_patches_list = [len(pixel_values) // len(questions)] * len(questions)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = []
        for question, n_tiles in zip(questions, num_patches_list, strict=True):
            if "<image>" not in question:
                question = "<image>\n" + question
            image = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.num_image_token * n_tiles)
            question = question.replace("<image>", image + IMG_END_TOKEN, 1)
            queries.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        tokens = tokenizer(queries, return_tensors="pt", padding=True, padding_side="left")
        device = pixel_values.device
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        output = self.generate(pixel_values, tokens["input_ids"].to(device),
                               tokens["attention_mask"].to(device),
                               {**generation_config, "eos_token_id": end})
        answers = tokenizer.batch_decode(output, skip_special_tokens=True)
        return [a.split("<|im_end|>")[0].strip() for a in answers]
