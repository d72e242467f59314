"""Tiny test fixture for vlmprobe: the config class named as in CogVLM2's remote code.

Written for vlmprobe's tests (not the published code).
"""

from transformers import PretrainedConfig


class CogVLMConfig(PretrainedConfig):
    model_type = "cogvlm2"

    def __init__(self, vocab_size=32, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_multi_query_heads=2, num_hidden_layers=4,
                 rms_norm_eps=1e-5, rope_theta=500000.0, vision_config=None,
                 bos_token_id=0, pad_token_id=1, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_multi_query_heads = num_multi_query_heads
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.vision_config = {
            "image_size": 112, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_heads": 2, "layer_norm_eps": 1e-6,
            **(vision_config or {}),
        }
        super().__init__(bos_token_id=bos_token_id, pad_token_id=pad_token_id, **kwargs)
