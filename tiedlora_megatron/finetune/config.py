"""The fine-tuning job's configuration: a YAML file plus `key=value` overrides, checked up front.

Every section is a dataclass whose fields are documented where they are declared. `load_job_config`
reads the YAML with OmegaConf, applies the dotted command-line overrides, and converts the result
into these dataclasses; `validate` then checks everything that can be checked without process
groups (adapter preset, parallel layout against the world size and the model's dimensions, data
files, batch arithmetic, Transformer Engine availability), so a typo fails in a second with a
message naming it, not after minutes of start-up on every rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import Version

from tiedlora_megatron.config import ConfigError, TiedLoRAConfig

MODEL_SOURCES = ("smollm2", "hf", "gguf", "megatron")
DTYPES = ("fp32", "bf16")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")
#: FP8 GEMMs need the token count of every TE layer's input to be a multiple of this.
FP8_TOKEN_MULTIPLE = 16
#: The first Transformer Engine release with current (tensorwise) FP8 scaling.
TENSORWISE_MIN_TE = "2.2"


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
    """megatron-core linear layers to adapt: linear_qkv, linear_proj, linear_fc1, linear_fc2."""
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
    """Sequence parallelism (needs tp > 1)."""
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


# ---- checks that need no process group ----------------------------------------------------------


def _choice(value: Any, options: tuple, where: str) -> None:
    if value not in options:
        raise ConfigError(f"{where}={value!r}; choose one of {', '.join(map(str, options))}")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_arch(cfg: ModelSection):
    """The base model's GPTArch, read from its files' metadata only (no weights)."""
    from tiedlora_megatron.models import arch_from_hf_config, default_smollm2_path
    from tiedlora_megatron.models.gguf import arch_from_gguf, open_gguf
    from tiedlora_megatron.models.hf import read_hf_config
    from tiedlora_megatron.models.megatron_ckpt import read_checkpoint_arch

    if cfg.source == "smollm2":
        return arch_from_gguf(open_gguf(default_smollm2_path()))
    if cfg.path is None:
        raise ConfigError(f"model.source={cfg.source!r} needs model.path")
    if not Path(cfg.path).exists():
        raise ConfigError(f"model.path {cfg.path} does not exist")
    if cfg.source == "hf":
        return arch_from_hf_config(read_hf_config(cfg.path))
    if cfg.source == "gguf":
        return arch_from_gguf(open_gguf(cfg.path))
    return read_checkpoint_arch(cfg.path)[0]


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def token_multiple(cfg: JobConfig) -> int:
    """What every micro-batch's padded length must be a multiple of: TP under sequence
    parallelism (each rank holds length / TP tokens), times FP8_TOKEN_MULTIPLE under FP8."""
    multiple = cfg.parallel.tp if cfg.parallel.sp else 1
    return multiple * (FP8_TOKEN_MULTIPLE if cfg.precision.fp8 is not None else 1)


def tokenizer_path(m: ModelSection) -> str:
    """Where the job's tokenizer comes from: `model.tokenizer`, else the model itself (the
    SmolLM2 GGUF for `smollm2`); a megatron checkpoint carries none."""
    if m.tokenizer is not None:
        return m.tokenizer
    if m.source == "smollm2":
        from tiedlora_megatron.models import default_smollm2_path

        return str(default_smollm2_path())
    if m.source == "megatron":
        raise ConfigError("model.source=megatron needs model.tokenizer (an HF dir or GGUF)")
    return m.path


def validation_examples(cfg: JobConfig, usable: int, dp_size: int) -> tuple[int, int]:
    """(examples the validation loss uses, the unit they come in) for a validation split of
    `usable` examples: whole micro-batches on every data-parallel rank, at most
    `eval.val_examples` (0: all). The job and the pre-launch check share this rule."""
    wanted = usable if cfg.eval.val_examples == 0 else min(usable, cfg.eval.val_examples)
    unit = cfg.train.micro_batch * dp_size  # every pipeline sees whole micro-batches
    return wanted // unit * unit, unit


def validate(
    cfg: JobConfig, world_size: int | None = None, check_model: bool = True, command: str = "train"
) -> None:
    """Raise a ConfigError for anything wrong that is knowable before process groups start.
    `command` is the job's ('train' or 'eval'): only `eval` scores `eval.data`."""
    world = world_size or world_size_from_env()
    m, par, pr, d, t, ev = cfg.model, cfg.parallel, cfg.precision, cfg.data, cfg.train, cfg.eval
    _choice(m.source, MODEL_SOURCES, "model.source")
    _choice(m.spec, ("local", "te"), "model.spec")
    _choice(m.recompute, (None, "full", "selective"), "model.recompute")
    _choice(pr.dtype, DTYPES, "precision.dtype")
    _choice(pr.fp8, (None, *FP8_FORMATS), "precision.fp8")
    _choice(pr.fp8_recipe, FP8_RECIPES, "precision.fp8_recipe")
    _choice(d.template, ("plain", "chat"), "data.template")
    _choice(cfg.optim.decay, ("cosine", "linear", "constant"), "optim.decay")
    _choice(ev.split, ("test", "validation"), "eval.split")
    if pr.fp8 is not None and m.spec != "te":
        raise ConfigError("precision.fp8 needs model.spec=te (FP8 runs in Transformer Engine)")
    if m.spec == "te" and m.source == "megatron":
        raise ConfigError(
            "model.spec=te builds the TE spec from HF, GGUF or SmolLM2 weights; a megatron "
            "checkpoint (model.source=megatron) loads onto model.spec=local only"
        )
    if m.spec == "te" and not te_available():
        raise ConfigError(
            "model.spec=te needs Transformer Engine, which is not installed here; "
            "use model.spec=local (and precision.fp8=null) or install transformer_engine[pytorch]"
        )
    if m.spec == "te" and pr.fp8 is not None and pr.fp8_recipe == "tensorwise":
        from tiedlora_megatron.te import te_version

        version = te_version()
        if version is not None and version < Version(TENSORWISE_MIN_TE):
            raise ConfigError(
                f"precision.fp8_recipe=tensorwise needs Transformer Engine >= "
                f"{TENSORWISE_MIN_TE}, found {version}; use precision.fp8_recipe=delayed"
            )
    cfg.adapter_config()  # preset, rank, targets: TiedLoRAConfig's own checks

    for name in ("tp", "pp"):
        if getattr(par, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1")
    if par.vpp is not None and (par.vpp < 2 or par.pp < 2):
        raise ConfigError("parallel.vpp needs parallel.pp > 1 and vpp >= 2 (or null)")
    if par.sp and par.tp < 2:
        raise ConfigError("parallel.sp (sequence parallelism) needs parallel.tp > 1")
    model_parallel = par.tp * par.pp
    if world % model_parallel:
        raise ConfigError(f"world size {world} is not divisible by tp x pp = {par.tp} x {par.pp}")
    dp = world // model_parallel
    if t.micro_batch < 1 or t.global_batch % (t.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch="
            f"{t.micro_batch} x data-parallel size {dp}"
        )
    if t.steps < 1:
        raise ConfigError("train.steps must be >= 1")
    if not 0 <= cfg.optim.warmup_steps < t.steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0 and below "
            f"train.steps={t.steps}"
        )
    o = cfg.optim
    if not o.lr > 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0 (the peak learning rate)")
    if o.min_lr < 0:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be >= 0")
    if o.min_lr > o.lr:
        raise ConfigError(
            f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}; the decay ends at min_lr, "
            "so it must be <= lr"
        )
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"optim.{name}={getattr(o, name)} must be in [0, 1)")
    if not o.adam_eps > 0:
        raise ConfigError(f"optim.adam_eps={o.adam_eps} must be > 0")
    if cfg.optim.clip_grad < 0:
        raise ConfigError("optim.clip_grad must be >= 0")
    if d.seq_length is not None and d.seq_length < 2:
        raise ConfigError("data.seq_length must be >= 2")
    if pr.fp8 is not None and d.seq_length is not None and d.seq_length % token_multiple(cfg):
        raise ConfigError(
            f"data.seq_length={d.seq_length} must be a multiple of {token_multiple(cfg)} under FP8 "
            f"({FP8_TOKEN_MULTIPLE} tokens per tensor-parallel rank)"
        )

    _choice(ev.metric, (None, "squad", "exact", "number"), "eval.metric")
    if ev.metric is not None and ev.data is None:
        raise ConfigError("eval.metric (--metric) applies to eval.data (--data) only")
    if ev.data is not None and command != "eval":
        raise ConfigError(
            "eval.data is read by the eval command only (tiedlora-finetune eval --data FILE); "
            "a training job scores data.test (or its task's test split)"
        )
    if ev.data is not None and not Path(ev.data).is_file():
        raise ConfigError(f"eval.data (--data) {ev.data}: no such file")
    if d.task is None and d.train is None and ev.data is None:
        raise ConfigError("set data.task (a built-in task) or data.train (a JSONL file)")
    for split in ("train", "validation", "test"):
        f = getattr(d, split)
        if f is not None and not Path(f).is_file():
            raise ConfigError(f"data.{split} file {f} does not exist")
    if d.task is not None:
        from tiedlora_megatron.data import DataError, get_task

        try:
            get_task(d.task)
        except DataError as e:
            raise ConfigError(f"data.task: {e}") from None

    _choice(t.on_config_change, ("refuse", "continue"), "train.on_config_change")
    if t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume={t.resume!r}: no such checkpoint directory")

    if check_model:
        arch = model_arch(m)
        try:
            arch.check_parallel(par.tp, par.pp, par.vpp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        longest = d.seq_length or d.max_length
        if longest > arch.max_position_embeddings:
            raise ConfigError(
                f"data.seq_length / data.max_length = {longest} exceeds the model's "
                f"{arch.max_position_embeddings} positions"
            )
