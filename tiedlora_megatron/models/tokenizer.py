"""Tokenizers for loaded models: from an HF model directory or from the vocabulary in a GGUF.

Both become a transformers fast tokenizer behind one small wrapper that encodes without
special tokens (chat templates already place them) and knows the model's stop tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tiedlora_megatron.models.hf import require

# llama.cpp pre-tokenizers that split digits one by one before GPT-2's byte-level regex.
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder"}
_PLAIN_BYTE_LEVEL_PRE = {"gpt2", "gpt-2", "default"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


@dataclass
class Tokenizer:
    """A transformers tokenizer plus the ids that end a generated answer."""

    hf: object
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        """Any id will do (padding is masked); the tokenizer's own when it has one."""
        pad = self.hf.pad_token_id
        return pad if pad is not None else 0

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered by the model's chat template."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text)


def _gguf_tokenizer(path: Path) -> Tokenizer:
    from tiedlora_megatron.models.gguf import metadata, open_gguf

    tk = require("tokenizers", "tokenizers")
    transformers = require("transformers", "'transformers<5'")
    reader = open_gguf(path)
    model = metadata(reader, "tokenizer.ggml.model")
    pre = metadata(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _DIGIT_SPLITTING_PRE | _PLAIN_BYTE_LEVEL_PRE:
        raise ValueError(
            f"unsupported GGUF tokenizer (model={model!r}, pre={pre!r}); supported: byte-level "
            f"BPE (model 'gpt2') with pre-tokenizer in {sorted(_DIGIT_SPLITTING_PRE)} or "
            f"{sorted(_PLAIN_BYTE_LEVEL_PRE)}"
        )
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    types = metadata(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges")]
    bpe = tk.Tokenizer(
        tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLITTING_PRE:
        digits = tk.pre_tokenizers.Digits(individual_digits=True)
        bpe.pre_tokenizer = tk.pre_tokenizers.Sequence([digits, byte_level])
    else:
        bpe.pre_tokenizer = byte_level
    bpe.decoder = tk.decoders.ByteLevel()
    bpe.add_tokens(
        [
            tk.AddedToken(t, special=ty == _GGUF_CONTROL, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
        ]
    )

    def token(key: str) -> str | None:
        idx = metadata(reader, f"tokenizer.ggml.{key}_token_id", -1)
        return tokens[idx] if idx >= 0 else None

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=metadata(reader, "tokenizer.chat_template", "") or None,
    )
    return Tokenizer(hf, [hf.eos_token_id])


def _hf_eos_ids(path: Path, hf) -> list[int]:
    """generation_config.json's eos ids (chat models list their turn-end token there)."""
    ids = [hf.eos_token_id] if hf.eos_token_id is not None else []
    gen = path / "generation_config.json"
    if gen.is_file():
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list(dict.fromkeys(ids))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of an HF model directory or a GGUF file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {p}")
    if p.is_file():
        return _gguf_tokenizer(p)
    transformers = require("transformers", "'transformers<5'")
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer files in {p}: {e}") from e
    return Tokenizer(hf, _hf_eos_ids(p, hf))
