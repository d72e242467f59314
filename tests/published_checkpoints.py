"""Checkpoint folders laid out from the published InternVL2 and CogVLM2 code (test support).

The published files are reference data (VLMPROBE_REFERENCE_CODE, default
../shared/reference/published-remote-code beside the project): they are copied into a
temporary folder, as the hub checkpoint ships them, next to the checkpoint's config
(`published_configs/`), never into the project. Used by tests/test_published_code.py and by
benchmarks/published_code_gpu.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "published_configs"
REFERENCE = Path(os.environ.get("VLMPROBE_REFERENCE_CODE",
                                ROOT.parent / "shared/reference/published-remote-code"))

# version -> (registry entry whose family and points apply, reference folder, config)
VERSIONS = {
    "internvl2_hub": ("internvl2", "internvl2_hub", "internvl2_8b.json"),
    "internvl_2024": ("internvl2", "internvl_2024", "internvl2_8b.json"),
    "cogvlm2": ("cogvlm2", "cogvlm2", "cogvlm2_llama3_chat_19b.json"),
}
# The 2024 files are the GitHub package's; its hub checkpoints shipped them flat, importing
# each other relatively, without the training-only peft/phi3 imports (as internvl2_hub/ is).
FLAT_LAYOUT = {
    "from internvl.conversation import": "from .conversation import",
    "from internvl.model.internlm2.modeling_internlm2 import": "from .modeling_internlm2 import",
    "from internvl.model.internlm2.configuration_internlm2 import":
        "from .configuration_internlm2 import",
}
TRAINING_ONLY = ("from internvl.model.phi3", "from peft import")
INTERNLM2_SPECIAL = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<ref>",
                     "</ref>", "<box>", "</box>"]


def internlm2_tokenizer(folder: Path) -> None:
    """A tiny sentencepiece model for the published InternLM2Tokenizer (it reads one)."""
    import sentencepiece as spm

    words = ("describe the image . find location of what colour is it red green blue circle "
             "square triangle user assistant system answer yes no").split()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(words)] * 20), model_writer=model, vocab_size=100,
        model_type="bpe", user_defined_symbols=INTERNLM2_SPECIAL, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "</s>", "add_bos_token": True}))


def published_folder(version: str, folder: Path) -> Path:
    """The published code of `version` laid out as its hub checkpoint ships it."""
    _, reference, config = VERSIONS[version]
    folder.mkdir(parents=True)
    for path in (REFERENCE / reference).glob("*.py"):
        lines = [line for line in path.read_text().splitlines(keepends=True)
                 if not line.startswith(TRAINING_ONLY)]
        text = "".join(lines)
        for package, flat in FLAT_LAYOUT.items():
            text = text.replace(package, flat)
        (folder / path.name).write_text(text)
    if "from .flash_attention import" in (folder / "modeling_intern_vit.py").read_text(
            ) if (folder / "modeling_intern_vit.py").exists() else False:
        # The package's flash_attention module needs flash-attn, which has no CPU build; its
        # import sits in a try block that falls back to plain attention, as without flash-attn.
        (folder / "flash_attention.py").write_text(
            'raise ImportError("flash-attn is not installed")\n')
    shutil.copy(CONFIGS / config, folder / "config.json")
    if (folder / "tokenization_internlm2.py").exists():
        internlm2_tokenizer(folder)
    return folder
