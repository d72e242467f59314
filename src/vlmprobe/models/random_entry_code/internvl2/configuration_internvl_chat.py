"""Tiny test fixture for vlmprobe: configs with the published InternVL2 remote-code names.

Written for vlmprobe's tests (not the published code): just enough to build a model with
InternVL2's module layout from `trust_remote_code` loading.
"""

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, image_size=112, patch_size=14, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=4, num_attention_heads=2, layer_norm_eps=1e-6,
                 initializer_factor=0.1, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.layer_norm_eps = layer_norm_eps
        self.initializer_factor = initializer_factor


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, downsample_ratio=0.5,
                 force_image_size=None, select_layer=-1, max_dynamic_patch=12,
                 use_thumbnail=True, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = InternLM2Config(**(llm_config or {}))
        self.downsample_ratio = downsample_ratio
        self.force_image_size = force_image_size or self.vision_config.image_size
        self.select_layer = select_layer
        self.max_dynamic_patch = max_dynamic_patch
        self.use_thumbnail = use_thumbnail

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
