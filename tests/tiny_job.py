"""A tiny fine-tuning job on disk: a random HF Llama with SmolLM2's tokenizer, and JSONL data.

Real formats end to end (transformers' safetensors checkpoint, tokenizer files, JSONL examples),
small enough that a torchrun job on 2-4 CPU ranks takes seconds per step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "river",
    "stone",
    "bird",
    "fish",
]


def _examples(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        out.append({"input": f"Repeat: {' '.join(words)}\nAnswer:", "output": " ".join(words)})
    return out


#: (layers, moe) -> a private copy of that model, built once per process (tests copy it)
_BUILT: dict[tuple[int, bool], Path] = {}


def make_tiny_job(root: Path, layers: int = 4, moe: bool = False) -> dict[str, str]:
    """Write the model and data under `root`; return the overrides that point a job at them.
    `moe`: a Mixtral (4 experts, top 2) instead of a Llama. The same arguments give the same
    files (seeded), built once per process and copied."""
    import shutil
    import tempfile

    model_dir = root / ("model_moe" if moe else "model")
    if not (model_dir / "config.json").is_file():
        built = _BUILT.get((layers, moe))
        if built is None or not (built / "config.json").is_file():
            built = Path(tempfile.mkdtemp(prefix="tiny_model_")) / "model"
            _build_model(built, layers, moe)
            _BUILT[layers, moe] = built
        shutil.copytree(built, model_dir, dirs_exist_ok=True)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, (n, seed) in {"train": (64, 0), "validation": (16, 1), "test": (8, 2)}.items():
        lines = [json.dumps(e) for e in _examples(n, seed)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "model.path": str(model_dir),
        "model.tokenizer": str(model_dir),
        "data.train": str(data / "train.jsonl"),
        "data.validation": str(data / "validation.jsonl"),
        "data.test": str(data / "test.jsonl"),
    }


def _build_model(model_dir: Path, layers: int, moe: bool) -> None:
    """A random HF Llama (or Mixtral) with SmolLM2's tokenizer, seeded, saved to `model_dir`."""
    import torch
    import transformers

    from tiedlora_megatron.models import default_smollm2_path, load_tokenizer

    tok = load_tokenizer(default_smollm2_path())
    torch.manual_seed(0)
    dims = dict(
        vocab_size=len(tok.hf),
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    if moe:
        config = transformers.MixtralConfig(
            **dims, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2
        )
        model = transformers.MixtralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**dims, intermediate_size=128)
        )
    model.save_pretrained(model_dir)
    tok.hf.save_pretrained(model_dir)


if __name__ == "__main__":
    import sys

    args = [a for a in sys.argv[1:] if a != "--moe"]
    overrides = make_tiny_job(Path(args[0] if args else "runs/tiny"), moe="--moe" in sys.argv)
    print(" ".join(f"{k}={v}" for k, v in overrides.items()))


def tiny_llama_config():
    """A tiny GQA Llama (2 layers, hidden 64, 4 heads over 2 KV groups, vocab 101): the HF base
    the export tests save and convert."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
