"""The fine-tuning job's checks that need no process group: `validate` and the rules the job
and the pre-launch check share.

`validate` checks everything knowable before process groups start (adapter preset, parallel
layout against the world size and the model's dimensions, data files, batch arithmetic,
Transformer Engine availability), so a typo fails in a second with a message naming it, not
after minutes of start-up on every rank.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from packaging.version import Version

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune.config import (
    DTYPES,
    FP8_FORMATS,
    FP8_RECIPES,
    MODEL_SOURCES,
    JobConfig,
    ModelSection,
)
from tiedlora_megatron.params import ModelDims

#: FP8 GEMMs need the token count of every TE layer's input to be a multiple of this.
FP8_TOKEN_MULTIPLE = 16
#: The first Transformer Engine release with current (tensorwise) FP8 scaling.
TENSORWISE_MIN_TE = "2.2"


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

    for name in ("tp", "pp", "ep", "etp"):
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
    if par.etp not in (1, par.tp):
        raise ConfigError(
            f"parallel.etp={par.etp}: expert tensor parallelism must be 1 or parallel.tp ({par.tp})"
        )
    if (dp * par.tp) % (par.ep * par.etp):
        raise ConfigError(
            f"parallel.ep x parallel.etp = {par.ep} x {par.etp} must divide the tp x "
            f"data-parallel ranks of a pipeline stage ({par.tp} x {dp}): experts are spread "
            "over ranks of the same stage"
        )
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
            arch.check_parallel(par.tp, par.pp, par.vpp, par.ep, par.sp, par.etp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dims = ModelDims(**{f.name: getattr(arch, f.name) for f in dataclasses.fields(ModelDims)})
        for target in cfg.adapter.target_modules:
            dims.target_shape(target)  # a ConfigError names an MLP the model does not have
        if arch.num_moe_experts and m.spec == "te":
            raise ConfigError(
                f"model.spec=te: the {arch.family} MoE model is built on the local spec only "
                "(SequentialMLP experts, which the adapters reach one expert at a time)"
            )
        longest = d.seq_length or d.max_length
        if longest > arch.max_position_embeddings:
            raise ConfigError(
                f"data.seq_length / data.max_length = {longest} exceeds the model's "
                f"{arch.max_position_embeddings} positions"
            )
