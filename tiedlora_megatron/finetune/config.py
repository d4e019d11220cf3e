"""The fine-tuning job's configuration: a YAML file plus `key=value` overrides.

Every section is a dataclass whose fields are documented where they are declared. `load_job_config`
reads the YAML with OmegaConf, applies the dotted command-line overrides, and converts the result
into these dataclasses, refusing unknown keys and wrong types; `checks.validate` then checks what
the values mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiedlora_megatron.config import ConfigError, TiedLoRAConfig

MODEL_SOURCES = ("smollm2", "hf", "gguf", "megatron")
DTYPES = ("fp32", "bf16")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")


@dataclass
class ModelSection:
    source: str = "smollm2"
    """Where the base model comes from: 'smollm2' (the offline SmolLM2-135M-Instruct GGUF),
    'hf' (a transformers checkpoint directory), 'gguf' (a llama.cpp file) or 'megatron' (a
    megatron-core dist checkpoint, a Megatron-LM or a NeMo 2 checkpoint)."""
    path: str | None = None
    """The checkpoint for 'hf', 'gguf' and 'megatron'; unused for 'smollm2'."""
    tokenizer: str | None = None
    """An HF directory or GGUF file with the tokenizer; default: `path` (or the SmolLM2 GGUF)."""
    spec: str = "local"
    """megatron-core layer spec: 'local' (plain torch) or 'te' (Transformer Engine, for FP8)."""
    recompute: str | None = None
    """Activation recompute: null, 'full' (every layer) or 'selective' (core attention)."""


@dataclass
class AdapterSection:
    preset: str = "vBuA"
    """A preset name ('lora', 'vera', 'vBuA', ...) or factor notation such as 'vB~uA'."""
    rank: int = 8
    """Rank r of the low-rank factors."""
    alpha: float | None = None
    """Scaling numerator: ΔW is scaled by alpha / rank; default: rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["linear_qkv"])
    """megatron-core linear layers to adapt: linear_qkv, linear_proj, linear_fc1, linear_fc2;
    on an MoE model experts.linear_fc1 / fc2 and shared_experts.linear_fc1 / fc2."""
    tie_experts: bool | None = None
    """Routed experts: share one A, B among all experts (true; default for tied presets) or
    keep one pair per expert (false). See TiedLoRAConfig.tie_experts."""
    seed: int = 1234
    """Seed of the factors' initialisation (the same on every rank and pipeline stage)."""


@dataclass
class ParallelSection:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); needs pp > 1."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1; required for an MoE model at tp > 1)."""
    ep: int = 1
    """Expert-parallel size (MoE models): the experts of each layer are split over ep of the
    tp x data-parallel ranks of a pipeline stage."""
    etp: int = 1
    """Expert tensor-parallel size (MoE models): 1 (every expert whole on its ranks) or tp
    (each expert split over the tensor-parallel group, megatron-core's default)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron's DistributedOptimizer, Adam)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""


@dataclass
class PrecisionSection:
    dtype: str = "fp32"
    """Parameter and compute dtype of the base model: 'fp32' or 'bf16' (adapters keep fp32
    master weights in the optimizer)."""
    fp8: str | None = None
    """FP8 format for the base model's TE layers: null, 'hybrid' or 'e4m3' (needs spec 'te')."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: 'delayed' or 'tensorwise' (current scaling, TE >= 2.2)."""


@dataclass
class DataSection:
    task: str | None = "squad"
    """A built-in task ('squad', see `tiedlora_megatron.data.tasks`), or null to use the JSONL
    files below."""
    train: str | None = None
    """JSONL of {"input", "output"} or {"messages": [...]} examples; overrides the task's split."""
    validation: str | None = None
    """JSONL used for validation loss and metrics during training."""
    test: str | None = None
    """JSONL used for the final evaluation."""
    template: str = "plain"
    """'plain' (prompt text as is, answer after a space) or 'chat' (the model's chat template)."""
    max_length: int = 320
    """Examples longer than this many tokens (prompt + answer) are dropped, never truncated."""
    seq_length: int | None = None
    """Pad every micro-batch to this length; required with pp > 1 (pipeline messages have one
    shape); default: pad to the longest example of each micro-batch (and max_length with pp > 1)."""
    bucket: bool = True
    """Group examples of similar length into a batch (less padding)."""
    seed: int = 0
    """Seed of the data order (a pure function of seed and step, so resume is exact)."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    decay: str = "cosine"
    """Decay after warm-up: 'cosine', 'linear' or 'constant'."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables); tied factors are counted once."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class TrainSection:
    steps: int = 100
    """Optimizer steps."""
    micro_batch: int = 8
    """Examples per micro-batch and data-parallel rank."""
    global_batch: int = 8
    """Examples per optimizer step over all data-parallel ranks (a multiple of
    micro_batch x data-parallel size; the rest is gradient accumulation)."""
    log_interval: int = 5
    """Steps between progress lines (rank 0)."""
    eval_interval: int = 0
    """Steps between validation-loss evaluations (0: only at the end)."""
    save_interval: int = 0
    """Steps between adapter checkpoints (0: only at the end)."""
    output_dir: str = "runs/tiedlora"
    """Checkpoints, metrics.jsonl, TensorBoard events and the summary go here."""
    resume: str = "auto"
    """'auto' (continue from the newest checkpoint in output_dir, if any), 'never' (refuse an
    output_dir that has checkpoints), or the path of a checkpoint to resume from."""
    on_config_change: str = "refuse"
    """When this configuration differs from the resumed checkpoint's in a key that can change
    the result: 'refuse' (the default; name the keys) or 'continue' (carry the adapters and
    optimizer state on under this configuration, the LR schedule rebuilt from it). Keys that
    cannot change the result: `finetune.checkpoints.RESULT_NEUTRAL_KEYS`."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the final one is always kept)."""
    exit_interval: int | None = None
    """Save and stop when the step is a multiple of this (a time-limited allocation's slice);
    rerunning the same command resumes."""
    seed: int = 0
    """Seed of dropout and everything else random in training."""


@dataclass
class EvalSection:
    val_examples: int = 200
    """Validation examples for the validation loss (0: all)."""
    num_examples: int = 200
    """Held-out examples scored with generated answers at the end (0: all; -1: skip).
    `eval.data` is always scored whole."""
    split: str = "test"
    """Split scored with generated answers: 'test' or 'validation'."""
    batch_size: int = 8
    """Prompts generated together."""
    max_new_tokens: int | None = None
    """Generation budget; default: the task's."""
    before: bool = False
    """Also score the base model (adapters at their zero start) before training."""
    data: str | None = None
    """`eval --data`, the eval command only: a JSONL file (as data.train) scored whole instead of
    the job's splits, without a task or validation loss (`finetune.evaluation.evaluate_file`)."""
    metric: str | None = None
    """With eval.data (`--metric`): 'squad' (exact match, F1; default), 'exact' or 'number'."""


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_config(self) -> TiedLoRAConfig:
        a = self.adapter
        return TiedLoRAConfig.preset(
            a.preset,
            rank=a.rank,
            alpha=a.alpha,
            dropout=a.dropout,
            target_modules=list(a.target_modules),
            tie_experts=a.tie_experts,
            seed=a.seed,
        )


# ---- from YAML + overrides to dataclasses -------------------------------------------------------


def _unknown(key: str, names: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {where}{key!r}{hint}; valid keys: {', '.join(names)}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check one value against its field's type; ints pass as floats, nothing else converts."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown(str(key), names, where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}{key}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> JobConfig:
    """A JobConfig from a nested mapping; unknown keys and wrong types are ConfigErrors."""
    return _build(JobConfig, values, "")


def load_job_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> JobConfig:
    """Read `path` (YAML; None: defaults only) and apply `key=value` overrides, e.g.
    `parallel.tp=2 adapter.target_modules=[linear_qkv,linear_fc1]`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            base = OmegaConf.load(p)
        except Exception as e:  # yaml.YAMLError and friends: name the file
            raise ConfigError(f"cannot parse {p}: {e}") from None
    else:
        base = OmegaConf.create({})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        values = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config or override: {e}") from None
    return config_from_dict(values or {})
