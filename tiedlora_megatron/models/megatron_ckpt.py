"""megatron-core `dist_checkpointing` checkpoints of base models, at any TP / PP.

Three layouts load:

* this module's own (`save_megatron_checkpoint`): each chunk's sharded state dict under
  megatron-LM's keys (`model`, or `model0`, `model1`, ... with virtual pipeline stages) plus the
  `GPTArch` and padded vocabulary size in the common state;
* Megatron-LM's: a root with `latest_checkpointed_iteration.txt` and `iter_0000100/` (or
  `release/`), each a dist checkpoint whose common state holds the training `args`, which map
  onto a `GPTArch`;
* any other dist checkpoint of a megatron-core GPTModel (e.g. NeMo 2's `weights/`), given its
  `arch=`; the key prefix (NeMo's `module.`) is found from the checkpoint's tensor names.

Sharded tensors carry global shapes and layer offsets, so the checkpoint's TP / PP / virtual-PP
layout never has to match the current one.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tiedlora_megatron import compat
from tiedlora_megatron.models.arch import GPTArch, ModelInfo, build_model

ARCH_KEY = "tiedlora_arch"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
EMBEDDING_KEY = "embedding.word_embeddings.weight"
# Plain-data types in Megatron-LM's common state besides megatron enums.
_PLAIN_TYPES = {"argparse.Namespace": argparse.Namespace, "_io.BytesIO": io.BytesIO}


def _chunk_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def save_megatron_checkpoint(chunks: list, arch: GPTArch, path: str | os.PathLike) -> None:
    """Save the model as a megatron dist checkpoint (collective: every rank must call it)."""
    from megatron.core import dist_checkpointing

    Path(path).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {k: c.sharded_state_dict() for k, c in zip(_chunk_keys(chunks), chunks, strict=True)}
    padded = chunks[0].vocab_size
    state[ARCH_KEY] = json.dumps({"arch": arch.to_dict(), "padded_vocab_size": padded})
    dist_checkpointing.save(state, str(path))


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The dist checkpoint directory `path` names: itself, Megatron-LM's latest iteration under
    a root (per its tracker file), or NeMo 2's `weights/`."""
    from megatron.core import dist_checkpointing

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"megatron checkpoint directory does not exist: {p}")
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            p = p / "release"
        else:
            try:
                p = p / f"iter_{int(text):07d}"
            except ValueError:
                raise ValueError(
                    f"corrupt Megatron-LM tracker file {tracker}: expected an iteration number "
                    f"or 'release', got {text[:80]!r}"
                ) from None
        if not p.is_dir():
            raise FileNotFoundError(f"{tracker} names {p.name}, which does not exist: {p}")
    elif (p / "weights").is_dir() and not dist_checkpointing.check_is_distributed_checkpoint(
        str(p)
    ):
        p = p / "weights"
    if not dist_checkpointing.check_is_distributed_checkpoint(str(p)):
        if any(p.glob("mp_rank_*")):
            raise ValueError(
                f"{p} is a Megatron-LM checkpoint in the legacy per-rank torch format "
                f"(--ckpt-format torch), not a megatron dist checkpoint; convert it first (Megatron-LM: "
                f"--ckpt-convert-format torch_dist)"
            )
        raise ValueError(f"{p} is not a megatron dist checkpoint (no valid metadata.json)")
    return p


def _safe_globals(pickled: io.BytesIO) -> list:
    """Types Megatron-LM pickles into the common state that torch's weights-only loader refuses
    by default: the args `Namespace`, byte buffers and megatron enums (all inert data)."""
    allowed: list = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(pickled):
        module, _, attr = name.rpartition(".")
        if name in _PLAIN_TYPES:
            allowed.append(_PLAIN_TYPES[name])
        elif module.startswith("megatron."):
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                continue  # torch's error below names it
            if isinstance(obj, type) and issubclass(obj, enum.Enum):
                allowed.append(obj)
    return allowed


def _weights_only_unpickle(pickled: io.BytesIO) -> Any:
    """Unpickle with torch's weights-only loader, allowing only `_safe_globals`' extra types."""
    allowed = _safe_globals(pickled)
    pickled.seek(0)
    with torch.serialization.safe_globals(allowed):
        return torch.load(pickled, map_location="cpu", weights_only=True)


def read_common_state(ckpt_dir: Path) -> dict:
    """A dist checkpoint's common (non-sharded) state, e.g. Megatron-LM's `args`, unpickled
    weights-only (megatron-core 0.19's own reader would unpickle anything)."""
    try:
        return compat.read_common_state(ckpt_dir, _weights_only_unpickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"cannot read the common state of {ckpt_dir} safely ({e}); pass arch= to load the "
            f"weights without it"
        ) from e


def _unsupported_settings(args: Any) -> list[str]:
    """Megatron-LM settings that change the model beyond what `GPTArch` describes."""
    checks = {
        "num_experts": "mixture of experts",
        "multi_latent_attention": "multi-latent attention",
        "qk_layernorm": "query/key layer norms",
        "apply_layernorm_1p": "zero-centred norm weights",
        "layernorm_zero_centered_gamma": "zero-centred norm weights",
        "rotary_interleaved": "interleaved rotary embeddings",
        "rotary_seq_len_interpolation_factor": "rotary position interpolation",
        "window_size": "sliding-window attention",
        "apply_residual_connection_post_layernorm": "post-norm residuals",
        "squared_relu": "squared-ReLU activation",
        "quick_geglu": "quick-GeGLU activation",
        "use_legacy_models": "legacy (pre-mcore) model",
        "heterogeneous_layers_config_path": "heterogeneous layers",
        "hybrid_override_pattern": "hybrid Mamba layers",
    }
    found = [
        f"{name}={getattr(args, name)!r} ({why})"
        for name, why in checks.items()
        if getattr(args, name, None)
    ]
    positions = getattr(args, "position_embedding_type", "learned_absolute")
    if positions not in ("rope", "learned_absolute"):
        found.append(f"position_embedding_type={positions!r} (only 'rope' / 'learned_absolute')")
    norm = getattr(args, "normalization", "LayerNorm")
    if norm not in ("LayerNorm", "RMSNorm"):
        found.append(f"normalization={norm!r} (only 'LayerNorm' / 'RMSNorm')")
    return found


def arch_from_megatron_lm_args(args: argparse.Namespace | dict) -> GPTArch:
    """The `GPTArch` of a model trained by Megatron-LM, from the `args` in its checkpoint.

    Missing settings take Megatron-LM's defaults. The real vocabulary is `args.vocab_size` when
    it was given, else the padded one (the tokenizer's size is not saved).
    """
    a = argparse.Namespace(**args) if isinstance(args, dict) else args
    unsupported = _unsupported_settings(a)
    if unsupported:
        raise ValueError(f"unsupported Megatron-LM model settings: {'; '.join(unsupported)}")
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if not hasattr(a, n)]
    if missing or not (getattr(a, "padded_vocab_size", None) or getattr(a, "vocab_size", None)):
        raise ValueError(
            f"Megatron-LM args lack {missing or ['padded_vocab_size']}; pass arch= explicitly"
        )
    hidden, heads = a.hidden_size, a.num_attention_heads
    swiglu = bool(getattr(a, "swiglu", False))
    bias = bool(getattr(a, "add_bias_linear", True))
    ffn = getattr(a, "ffn_hidden_size", None) or (
        int(4 * hidden * 2 / 3 / 64) * 64 if swiglu else 4 * hidden
    )
    if swiglu:
        activation = "silu"
    elif getattr(a, "openai_gelu", False) or (bias and getattr(a, "bias_gelu_fusion", False)):
        activation = "gelu_tanh"  # megatron's fused bias-GeLU is the tanh approximation
    else:
        activation = "gelu"
    eps = getattr(a, "norm_epsilon", None) or getattr(a, "layernorm_epsilon", None) or 1e-5
    return GPTArch(
        family="megatron-lm",
        num_layers=a.num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=(
            (getattr(a, "num_query_groups", None) or heads)
            if getattr(a, "group_query_attention", False)
            else heads
        ),
        kv_channels=getattr(a, "kv_channels", None) or hidden // heads,
        vocab_size=getattr(a, "vocab_size", None) or a.padded_vocab_size,
        max_position_embeddings=(
            getattr(a, "max_position_embeddings", None) or getattr(a, "seq_length", None) or 4096
        ),
        normalization=getattr(a, "normalization", "LayerNorm"),
        norm_eps=float(eps),
        gated_linear_unit=swiglu,
        activation=activation,
        position_embedding_type=getattr(a, "position_embedding_type", "learned_absolute"),
        tie_embeddings=not getattr(a, "untie_embeddings_and_output_weights", False),
        add_bias_linear=bias,
        add_qkv_bias=bool(getattr(a, "add_qkv_bias", False)),
        rotary_base=float(getattr(a, "rotary_base", 10000)),
        rotary_percent=float(getattr(a, "rotary_percent", 1.0)),
        rope_scaling_factor=(
            float(getattr(a, "rope_scaling_factor", 8.0))
            if getattr(a, "use_rope_scaling", False)
            else None
        ),
    )


def read_checkpoint_arch(path: str | os.PathLike) -> tuple[GPTArch, int]:
    """The architecture and padded vocabulary size of a checkpoint: this module's record, or
    Megatron-LM's `args`."""
    ckpt_dir = resolve_checkpoint_dir(path)
    common = read_common_state(ckpt_dir)
    if ARCH_KEY in common:
        meta = json.loads(common[ARCH_KEY])
        return GPTArch.from_dict(meta["arch"]), int(meta["padded_vocab_size"])
    if "args" in common:
        arch = arch_from_megatron_lm_args(common["args"])
        return arch, _embedding_shape(ckpt_dir)[1][0]
    raise ValueError(
        f"{ckpt_dir} records no architecture (neither {ARCH_KEY!r} from save_megatron_checkpoint "
        f"nor Megatron-LM's 'args'; common keys: {sorted(common)}): pass arch= explicitly"
    )


def _embedding_shape(ckpt_dir: Path) -> tuple[str, tuple[int, ...]]:
    """The key prefix of the model's tensors and the global shape of its word embeddings."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    # Optimizer state repeats the name under longer prefixes (`optimizer.state.exp_avg.`).
    matches = [key for key in metadata if key.endswith(EMBEDDING_KEY)]
    if not matches:
        raise ValueError(f"{ckpt_dir} holds no GPT word embeddings ('{EMBEDDING_KEY}')")
    key = min(matches, key=len)
    return key[: -len(EMBEDDING_KEY)], tuple(metadata[key].global_shape)


def load_megatron_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    arch: GPTArch | None = None,
    config_overrides: dict[str, Any] | None = None,
):
    """Build this rank's chunks for a checkpoint saved at any TP / PP and load it; (chunks, info).

    `path` is a dist checkpoint, a Megatron-LM checkpoint root or a NeMo 2 checkpoint; `arch`
    overrides (or, for checkpoints that record none, supplies) the architecture.
    """
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    ckpt_dir = resolve_checkpoint_dir(path)
    if arch is None:
        arch, _ = read_checkpoint_arch(ckpt_dir)
    prefix, (padded, hidden) = _embedding_shape(ckpt_dir)
    if hidden != arch.hidden_size:
        raise ValueError(
            f"{ckpt_dir} has hidden size {hidden} but the architecture says {arch.hidden_size}"
        )
    chunks = build_model(arch, dtype, padded_vocab_size=padded, config_overrides=config_overrides)
    keys = _chunk_keys(chunks)
    sharded = {k: c.sharded_state_dict() for k, c in zip(keys, chunks, strict=True)}
    add_prefix_for_sharding(sharded, prefix)
    # The weights need none of the common state, and Megatron-LM's / NeMo's pickled training
    # state (optimizer, RNG, args) is not ours to unpickle.
    loaded = compat.load_without_common_state(sharded, ckpt_dir)
    for key, chunk in zip(keys, chunks, strict=True):
        chunk.load_state_dict(loaded[key], strict=True)
    return chunks, ModelInfo(arch=arch, path=str(path), format="megatron")
