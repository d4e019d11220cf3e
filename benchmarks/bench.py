"""Step time, memory and communication of LoRA, VeRA and Tied-LoRA on one megatron-core GPT.

One run builds the same model and data for every method and measures, per method:
- step time (median, quartiles, per-round medians) and tokens/s, with each method's time as a
  ratio to LoRA's and to the floor (the frozen model's forward + activation backward);
- peak memory (CUDA max allocated, or CPU RSS above the idle process), bytes of trainable
  parameters, gradients and optimizer state read from the built DDP buffers and optimizer, and
  the adapter checkpoint's size on disk;
- collectives per step and the bytes they move per rank, split into the base model's and the
  adapters';
- trainable parameters and their ratio to LoRA.

Methods are built one at a time (so memory is that method's), in rounds whose order rotates, so
that machine drift spreads over all methods; ratios are given with their range over rounds.

    .venv/bin/python benchmarks/bench.py --model small --tp 2 --sp --out benchmarks/results/x

With `--tp N > 1` the script relaunches itself under torchrun; rank 0 prints and writes.
See benchmarks/README.md for the options, the byte model and the GPU script.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make `tiedlora_megatron` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALL_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
DEFAULT_METHODS = ["floor", "full", "lora", "vera", "vBuA", "BA"]
HF_METHODS = ["hf_floor", "hf_lora", "hf_vera"]

#: Llama-like model shapes. "l32" is narrow but 32 layers deep: the trainable-parameter ratio of
#: a tied adapter to LoRA depends on the depth and on d_out / (d_in + d_out), not on the width,
#: so it reproduces the paper's 7B-QKV ratio on a CPU. "7b-2l" is two layers of Llama-2-7B's
#: shape: the adapters' share of the collective bytes depends on the width (about r / hidden).
MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(layers=2, hidden=64, heads=4, groups=2, ffn=96, vocab=128, tie=False),
    "small": dict(layers=4, hidden=256, heads=8, groups=4, ffn=688, vocab=2048, tie=False),
    "7b-2l": dict(layers=2, hidden=4096, heads=32, groups=32, ffn=11008, vocab=1024, tie=False),
    "l32": dict(layers=32, hidden=256, heads=4, groups=4, ffn=688, vocab=512, tie=False),
    "100m": dict(layers=12, hidden=768, heads=12, groups=4, ffn=2048, vocab=32000, tie=True),
    "1b": dict(layers=16, hidden=2048, heads=32, groups=8, ffn=8192, vocab=128256, tie=True),
}

#: megatron target -> the transformers Llama module names that compute the same product.
HF_TARGETS = {
    "linear_qkv": ["q_proj", "k_proj", "v_proj"],
    "linear_proj": ["o_proj"],
    "linear_fc1": ["gate_proj", "up_proj"],
    "linear_fc2": ["down_proj"],
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    """Progress on rank 0 (stderr, so the table on stdout stays clean)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


# -- the model -----------------------------------------------------------------------------------


class SDPAttention(torch.nn.Module):
    """megatron's core-attention interface on `F.scaled_dot_product_attention` (causal, GQA).

    megatron's local `DotProductAttention` materialises the s x s scores; production runs use a
    fused kernel (TE / flash). Against a base with a fused attention the adapters' overhead is
    the one users see, and it is the attention transformers' Llama uses ("sdpa").
    """

    def __init__(self, config: Any, softmax_scale: float | None = None, **_: Any):
        super().__init__()
        self.config = config
        self.softmax_scale = softmax_scale

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any
    ) -> torch.Tensor:
        # [s, b, heads, d] -> [b, heads, s, d] and back to [s, b, heads * d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out.permute(2, 0, 1, 3).flatten(2)


def transformer_config(args: argparse.Namespace) -> Any:
    from megatron.core.transformer import TransformerConfig

    from tiedlora_megatron.spec import unfused_settings

    m = MODELS[args.model]
    dtype = DTYPES[args.dtype]
    return TransformerConfig(
        num_layers=m["layers"],
        hidden_size=m["hidden"],
        num_attention_heads=m["heads"],
        num_query_groups=m["groups"],
        ffn_hidden_size=m["ffn"],
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        tensor_model_parallel_size=args.tp,
        sequence_parallel=args.sp,
        use_cpu_initialization=args.device == "cpu",
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **unfused_settings(),
    )


def build_gpt(args: argparse.Namespace, config: Any) -> torch.nn.Module:
    """The same GPTModel (local spec, sequence-parallel norms) for every method, from one seed."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tiedlora_megatron.spec import gpt_block_spec

    block = gpt_block_spec(config)
    if args.attention == "sdpa":
        block = dataclasses.replace(block, layer_specs=[_with_sdpa(s) for s in block.layer_specs])
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    m = MODELS[args.model]
    model = GPTModel(
        config,
        transformer_layer_spec=block,
        vocab_size=m["vocab"],
        max_sequence_length=args.seq_len,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=m["tie"],
    )
    return model.to(_device(args)) if args.device != "cpu" else model


def _with_sdpa(layer_spec: Any) -> Any:
    layer = layer_spec.submodules
    attn = layer.self_attention
    attn = dataclasses.replace(
        attn, submodules=dataclasses.replace(attn.submodules, core_attention=SDPAttention)
    )
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer, self_attention=attn)
    )


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_batch(args: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of (tokens, labels), the same on every rank and for every method."""
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1), generator=g)
    dev = _device(args)
    return tokens[:, :-1].contiguous().to(dev), tokens[:, 1:].contiguous().to(dev)


# -- one method ------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    """What to train: nothing (the floor), everything, or an adapter preset."""

    name: str
    kind: str  # "floor" | "full" | "adapter" | "hf_floor" | "hf_adapter"
    preset: str | None = None

    @classmethod
    def parse(cls, name: str) -> Method:
        if name in ("floor", "full", "hf_floor"):
            return cls(name, name)
        if name in ("hf_lora", "hf_vera"):
            return cls(name, "hf_adapter", name[3:])
        return cls(name, "adapter", name)


class MegatronRunner:
    """One method on the megatron GPT: model, DDP, optimizer and a training step as users run it
    (megatron's schedule, finalize_model_grads, get_megatron_optimizer)."""

    def __init__(self, method: Method, args: argparse.Namespace):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

        self.method = method
        self.args = args
        self.config = transformer_config(args)
        model = build_gpt(args, self.config)
        self.adapters = None
        if method.kind == "adapter":
            cfg = TiedLoRAConfig.preset(
                method.preset, rank=args.rank, alpha=args.alpha, target_modules=args.targets
            )
            self.adapters = apply_tied_lora(model, cfg)
        elif method.kind == "floor":
            for p in model.parameters():
                p.requires_grad_(False)
            # Nothing trains, but the backward must still run through every layer's activations.
            model.embedding.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if self.config.bf16:
            model = Float16Module(self.config, model)
        self.ddp = None
        self.optimizer = None
        if self.trainable:
            self.ddp = DistributedDataParallel(self.config, DistributedDataParallelConfig(), model)
            opt_cfg = OptimizerConfig(
                optimizer="adam",
                lr=args.lr,
                weight_decay=0.0,
                bf16=self.config.bf16,
                params_dtype=self.config.params_dtype,
            )
            self.optimizer = get_megatron_optimizer(opt_cfg, [self.ddp])
            model = self.ddp
        self.wrapped = model
        self.batch = make_batch(args, MODELS[args.model]["vocab"])
        self.phase: Callable[[str], contextlib.AbstractContextManager] = _no_phase

    def _forward_step(self, data_iterator: Iterator, model: torch.nn.Module) -> Any:
        tokens, labels = next(data_iterator)
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        output = model(tokens, position_ids, None, labels=labels)

        def loss_func(out: torch.Tensor) -> tuple[torch.Tensor, dict]:
            loss = out.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    def step(self) -> None:
        """One training step: forward, backward, gradient finalisation, optimizer step."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def finalize(*a: Any, **k: Any) -> None:
            with self.phase("update"):
                finalize_model_grads(*a, **k)

        cfg = self.config
        cfg.finalize_model_grads_func = finalize if self.ddp is not None else None
        cfg.no_sync_func = self.ddp.no_sync if self.ddp is not None else None
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter([self.batch]),
            model=self.wrapped,
            num_microbatches=1,
            seq_length=self.args.seq_len,
            micro_batch_size=self.args.micro_batch,
            forward_only=False,
        )
        if self.optimizer is not None:
            with self.phase("update"):
                self.optimizer.step()

    def num_trainable(self) -> int:
        """Trainable parameters of the whole model, unsharded."""
        if self.adapters is not None:
            return self.adapters.num_trainable_parameters()
        tp = self.args.tp
        return sum(p.numel() * (tp if _is_tp_sharded(p) else 1) for p in self.trainable)

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes of trainable params, gradient buffers and optimizer state, read
        from the built DDP and optimizer (after a step, when Adam's state exists)."""
        grads = 0
        if self.ddp is not None:
            for buf in self.ddp.buffers + self.ddp.expert_parallel_buffers:
                grads += _nbytes(buf.grad_data)
        moments, master = 0, 0
        for opt in _leaf_optimizers(self.optimizer):
            for state in opt.optimizer.state.values():
                moments += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
            for group in getattr(opt, "fp32_from_float16_groups", []):
                master += sum(_nbytes(p) for p in group)
        return {
            "param_bytes": sum(_nbytes(p) for p in self.trainable),
            "grad_bytes": grads,
            "master_bytes": master,
            "moment_bytes": moments,
        }

    def checkpoint_bytes(self, directory: str) -> int:
        """Size on disk of this rank's share of the trainable weights: sharded tensors on every
        rank, replicated ones on TP rank 0 only (as a distributed checkpoint stores them)."""
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank()
        named = {
            n: p.detach().cpu()
            for n, p in self.model.named_parameters()
            if p.requires_grad and (tp_rank == 0 or _is_tp_sharded(p))
        }
        path = Path(directory) / f"{self.method.name}_rank{dist.get_rank()}.pt"
        torch.save(named, path)
        return path.stat().st_size

    def adapter_mappings(self) -> contextlib.AbstractContextManager:
        """While active, collectives issued by the adapters' mappings count as the adapters'."""
        return _tag_adapter_mappings()


class HFRunner:
    """The peer a user would otherwise pick: transformers' Llama with HF PEFT LoRA / VeRA, the
    same dims, batch and targets (megatron names mapped to q/k/v_proj, ...), torch AdamW."""

    def __init__(self, method: Method, args: argparse.Namespace):
        from transformers import LlamaConfig, LlamaForCausalLM

        m = MODELS[args.model]
        self.method = method
        self.args = args
        hf_cfg = LlamaConfig(
            vocab_size=m["vocab"],
            hidden_size=m["hidden"],
            intermediate_size=m["ffn"],
            num_hidden_layers=m["layers"],
            num_attention_heads=m["heads"],
            num_key_value_heads=m["groups"],
            max_position_embeddings=args.seq_len,
            tie_word_embeddings=m["tie"],
            attn_implementation="sdpa",
        )
        torch.manual_seed(args.seed)
        with torch.device(_device(args)):
            model = LlamaForCausalLM(hf_cfg).to(DTYPES[args.dtype])
        model.config.use_cache = False
        if method.kind == "hf_floor":
            model.requires_grad_(False)
            model.get_input_embeddings().register_forward_hook(
                lambda _m, _i, out: out.requires_grad_()
            )
        else:
            model = _peft_model(model, method.preset, args)
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=args.lr) if self.trainable else None
        self.batch = make_batch(args, m["vocab"])
        self.phase: Callable[[str], contextlib.AbstractContextManager] = _no_phase

    def step(self) -> None:
        tokens, labels = self.batch
        logits = self.model(input_ids=tokens).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def state_bytes(self) -> dict[str, int]:
        moments = 0
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                moments += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
        return {
            "param_bytes": sum(_nbytes(p) for p in self.trainable),
            "grad_bytes": sum(_nbytes(p.grad) for p in self.trainable if p.grad is not None),
            "master_bytes": 0,
            "moment_bytes": moments,
        }

    def checkpoint_bytes(self, directory: str) -> int:
        named = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        path = Path(directory) / f"{self.method.name}.pt"
        torch.save(named, path)
        return path.stat().st_size

    def adapter_mappings(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _peft_model(model: torch.nn.Module, preset: str, args: argparse.Namespace) -> torch.nn.Module:
    try:
        from peft import LoraConfig, VeraConfig, get_peft_model
    except ImportError as e:
        raise SystemExit("the hf_* methods need HF PEFT: pip install peft") from e
    modules = [name for t in args.targets for name in HF_TARGETS[t]]
    if preset == "lora":
        cfg: Any = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=modules)
    else:
        cfg = VeraConfig(r=args.rank, target_modules=modules)
    return get_peft_model(model, cfg)


def _no_phase(_name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_tp_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def _leaf_optimizers(opt: Any) -> Iterator[Any]:
    if opt is None:
        return
    if hasattr(opt, "chained_optimizers"):
        for inner in opt.chained_optimizers:
            yield from _leaf_optimizers(inner)
    else:
        yield opt


# -- counting collectives --------------------------------------------------------------------


class CollectiveCounter:
    """Counts the collectives of one step by wrapping torch.distributed and the copies megatron
    binds at import, and files each under "adapter" (issued by an adapter, forward or
    backward), "update" (gradient finalisation and optimizer step) or "base" (the rest).

    Bytes are what one rank sends with a ring algorithm (p ranks, N bytes of full tensor):
    all-reduce 2(p-1)/p N, all-gather and reduce-scatter (p-1)/p N. Collectives over a group
    of one rank move nothing and are not counted.
    """

    _WRAPPED = (
        ("torch.distributed", "all_reduce", "all_reduce"),
        ("torch.distributed", "all_gather_into_tensor", "all_gather"),
        ("torch.distributed", "reduce_scatter_tensor", "reduce_scatter"),
        ("torch.distributed", "all_gather", "all_gather_list"),
        ("torch.distributed", "broadcast", "broadcast"),
        # megatron modules that bind their own copies at import: trainable sequence-parallel
        # layers (layers.py), the mappings, and the distributed optimizer's buffers
        *(
            (f"megatron.core.{module}", f"dist_{op}_func", op)
            for module in (
                "tensor_parallel.layers",
                "tensor_parallel.mappings",
                "distributed.param_and_grad_buffer",
            )
            for op in ("all_gather", "reduce_scatter")
        ),
    )

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.phase_name = "base"
        self._saved: list[tuple[Any, str, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.phase_name = self.phase_name, name
        try:
            yield
        finally:
            self.phase_name = previous

    def __enter__(self) -> CollectiveCounter:
        import importlib

        for module_name, attr, op in self._WRAPPED:
            module = importlib.import_module(module_name)
            fn = getattr(module, attr, None)
            if fn is not None:
                self._saved.append((module, attr, fn))
                setattr(module, attr, self._counted(fn, op))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, attr, fn in reversed(self._saved):
            setattr(module, attr, fn)
        self._saved.clear()

    def _counted(self, fn: Callable, op: str) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self._record(op, args, kwargs)
            return fn(*args, **kwargs)

        return counted

    def _record(self, op: str, args: tuple, kwargs: dict) -> None:
        positional_group = 3 if op == "reduce_scatter" else 2
        group = kwargs.get("group")
        if group is None and len(args) > positional_group:
            group = args[positional_group]
        p = dist.get_world_size(group)
        if p == 1:
            return
        if op == "all_gather_list":
            full = _nbytes(args[1]) * p
        elif op == "all_gather":
            full = _nbytes(args[0])  # the gathered output
        else:
            full = _nbytes(args[1] if op == "reduce_scatter" else args[0])
        factor = {"all_reduce": 2 * (p - 1) / p, "broadcast": 1.0}.get(op, (p - 1) / p)
        category = "adapter" if _ADAPTER_SCOPE[0] else self.phase_name
        self.records.append(
            {"op": op, "category": category, "bytes": int(full * factor), "full_bytes": full}
        )

    def summary(self, adapter_method: bool) -> dict[str, int]:
        """Counts and bytes per category; `update` collectives belong to whatever trains."""
        out = {f"{c}_{k}": 0 for c in ("base", "adapter") for k in ("collectives", "bytes")}
        for r in self.records:
            owner = r["category"]
            if owner == "update":
                owner = "adapter" if adapter_method else "base"
            out[f"{owner}_collectives"] += 1
            out[f"{owner}_bytes"] += r["bytes"]
        return out


_ADAPTER_SCOPE = [False]  # not thread-local: CUDA backward runs on autograd's device thread


@contextlib.contextmanager
def _adapter_scope() -> Iterator[None]:
    previous, _ADAPTER_SCOPE[0] = _ADAPTER_SCOPE[0], True
    try:
        yield
    finally:
        _ADAPTER_SCOPE[0] = previous


class _InAdapterScope(torch.autograd.Function):
    """Runs a megatron mapping in the adapter scope, and its backward (with that backward's
    collective) in the adapter scope too, by re-entering autograd on a saved subgraph."""

    @staticmethod
    def forward(ctx: Any, fn: Callable, args: tuple, kwargs: dict, x: torch.Tensor) -> Any:
        with _adapter_scope(), torch.enable_grad():
            ctx.inp = x.detach().requires_grad_(x.requires_grad)
            ctx.out = fn(ctx.inp, *args, **kwargs)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, torch.Tensor]:
        with _adapter_scope():
            (g,) = torch.autograd.grad(ctx.out, ctx.inp, grad)
        return None, None, None, g


class _TaggedMappings:
    """`megatron.core.tensor_parallel.mappings` as the adapter module sees it while counting."""

    def __init__(self, mappings: Any):
        self._mappings = mappings

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._mappings, name)

        def tagged(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return _InAdapterScope.apply(fn, args, kwargs, x)

        return tagged


@contextlib.contextmanager
def _tag_adapter_mappings() -> Iterator[None]:
    from tiedlora_megatron import adapter

    original = adapter.mappings
    adapter.mappings = _TaggedMappings(original)
    try:
        yield
    finally:
        adapter.mappings = original


# -- memory --------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_memory() -> None:
    """Free what the last method left, and hand freed heap pages back to the OS so that RSS
    measures the next method alone."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Samples this process's RSS on a thread (CPU has no allocator peak to ask)."""

    def __init__(self, interval_s: float = 0.002):
        import threading

        self.interval_s = interval_s
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# -- measuring -----------------------------------------------------------------------------


def _sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def _reduce_max(values: list[float]) -> list[float]:
    """The per-element maximum over ranks (a step is as slow as its slowest rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=_backend_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_sum(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=_backend_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


def measure_method(method: Method, args: argparse.Namespace, first_round: bool) -> dict:
    """Build `method`, warm up, and time `args.steps` steps; in the first round also measure
    memory, state bytes, the checkpoint and one step's collectives."""
    _release_memory()
    idle_rss = _rss_bytes()
    runner_cls = HFRunner if method.kind.startswith("hf_") else MegatronRunner
    runner = runner_cls(method, args)
    result: dict[str, Any] = {"method": method.name}
    runner.step()  # first step: lazy allocations (Adam state, buffers)
    _sync(args)
    if first_round:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            for _ in range(max(1, args.warmup - 1)):
                runner.step()
            _sync(args)
        cuda = args.device == "cuda"
        peak = torch.cuda.max_memory_allocated() if cuda else rss.peak - idle_rss
        result["peak_mem_bytes"] = int(_reduce_max([float(peak)])[0])
        result["trainable"] = runner.num_trainable()
        state = runner.state_bytes()
        result.update(
            {k: int(v) for k, v in zip(state, _reduce_max(list(state.values())), strict=True)}
        )
        with tempfile.TemporaryDirectory() as d:
            result["ckpt_bytes"] = (
                _reduce_sum(runner.checkpoint_bytes(d)) if runner.trainable else 0
            )
        counter = CollectiveCounter()
        runner.phase = counter.phase
        with counter, runner.adapter_mappings():
            runner.step()
        runner.phase = _no_phase
        result.update(counter.summary(method.kind == "adapter"))
        result["collective_records"] = counter.records
    else:
        for _ in range(max(1, args.warmup - 1)):
            runner.step()
    _sync(args)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        runner.step()
        _sync(args)
        times.append(time.perf_counter() - t0)
    result["times_s"] = _reduce_max(times)
    del runner
    _release_memory()
    return result


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    """All methods, `args.rounds` rounds in rotating order; one merged row per method.
    Needs an initialised process group of `args.tp` ranks (DP = 1)."""
    from megatron.core import parallel_state as ps

    methods = [Method.parse(m) for m in args.methods]
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    try:
        # One unmeasured build and step first: the process's one-time allocations (thread pools,
        # megatron's global buffers) would otherwise count as the first method's memory (once
        # per framework: transformers has its own).
        no_steps = argparse.Namespace(**{**vars(args), "steps": 0})
        for first in {m.kind.startswith("hf_"): m for m in reversed(methods)}.values():
            measure_method(first, no_steps, first_round=False)
        rows: dict[str, dict] = {}
        round_medians: dict[str, list[float]] = {m.name: [] for m in methods}
        for r in range(args.rounds):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]
            for m in order:
                t0 = time.perf_counter()
                res = measure_method(m, args, first_round=r == 0)
                times = res.pop("times_s")
                round_medians[m.name].append(statistics.median(times))
                row = rows.setdefault(m.name, {"times_s": []})
                row.update(res)
                row["times_s"].extend(times)
                log(
                    f"[round {r + 1}/{args.rounds}] {m.name:>9}: median step "
                    f"{1e3 * statistics.median(times):8.2f} ms ({time.perf_counter() - t0:.1f} s)"
                )
        return summarise([rows[m.name] for m in methods], round_medians, args)
    finally:
        ps.destroy_model_parallel()


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(rows: list[dict], round_medians: dict[str, list[float]], args: argparse.Namespace):
    """Add medians, spreads, tokens/s and the ratios to LoRA and to the floor. The methods of a
    round ran back to back, so a ratio is the median of the per-round ratios of medians, and
    its range their min..max."""
    tokens = args.micro_batch * args.seq_len
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        t = r["times_s"]
        r["step_ms"] = 1e3 * statistics.median(t)
        r["step_ms_min"] = 1e3 * min(t)
        r["step_ms_p25"] = 1e3 * _quantile(t, 0.25)
        r["step_ms_p75"] = 1e3 * _quantile(t, 0.75)
        r["tokens_per_s"] = tokens / statistics.median(t)
        r["train_state_bytes"] = sum(
            r.get(k, 0) for k in ("param_bytes", "grad_bytes", "master_bytes", "moment_bytes")
        )
        total = r.get("base_bytes", 0) + r.get("adapter_bytes", 0)
        r["adapter_bytes_share"] = r.get("adapter_bytes", 0) / total if total else 0.0
    for r in rows:
        for ref in ("lora", "floor", "hf_lora", "hf_floor"):
            if ref not in by_name:
                continue
            pairs = zip(round_medians[r["method"]], round_medians[ref], strict=True)
            ratios = [a / b for a, b in pairs]
            r[f"time_vs_{ref}"] = statistics.median(ratios)
            r[f"time_vs_{ref}_range"] = [min(ratios), max(ratios)]
        lora = by_name.get("lora")
        if lora is not None:
            r["trainable_vs_lora"] = r["trainable"] / lora["trainable"]
            r["train_state_vs_lora"] = r["train_state_bytes"] / lora["train_state_bytes"]
    return rows


# -- reporting -----------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ratio(r: dict, ref: str) -> str:
    v = r.get(f"time_vs_{ref}")
    if v is None:
        return "-"
    lo, hi = r[f"time_vs_{ref}_range"]
    return f"{v:.3f} [{lo:.2f}-{hi:.2f}]"


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    """The printed table: one line per method."""
    head = [
        "method",
        "trainable",
        "vs LoRA",
        "step ms",
        "p25-p75",
        "min",
        "tok/s",
        "time/LoRA",
        "time/floor",
        "peak mem",
        "params+grads+opt",
        "vs LoRA",
        "ckpt",
        "coll base",
        "coll adapter",
        "bytes base",
        "bytes adapter",
        "adapter %",
    ]
    lines = []
    for r in rows:
        lines.append(
            [
                r["method"],
                f"{r['trainable']:,}",
                f"{r['trainable_vs_lora']:.4f}" if "trainable_vs_lora" in r else "-",
                f"{r['step_ms']:.2f}",
                f"{r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f}",
                f"{r['step_ms_min']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                _fmt_ratio(r, "lora" if not r["method"].startswith("hf_") else "hf_lora"),
                _fmt_ratio(r, "floor" if not r["method"].startswith("hf_") else "hf_floor"),
                _fmt_bytes(r["peak_mem_bytes"]),
                _fmt_bytes(r["train_state_bytes"]),
                f"{r['train_state_vs_lora']:.4f}" if "train_state_vs_lora" in r else "-",
                _fmt_bytes(r["ckpt_bytes"]),
                str(r["base_collectives"]),
                str(r["adapter_collectives"]),
                _fmt_bytes(r["base_bytes"]),
                _fmt_bytes(r["adapter_bytes"]),
                f"{100 * r['adapter_bytes_share']:.3f}",
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for line in lines:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
    return "\n".join([describe_run(args), "", *out])


def describe_run(args: argparse.Namespace) -> str:
    m = MODELS[args.model]
    return (
        f"model {args.model} (L={m['layers']}, h={m['hidden']}, heads={m['heads']}/"
        f"{m['groups']} kv, ffn={m['ffn']}, vocab={m['vocab']}), seq {args.seq_len} x micro-batch "
        f"{args.micro_batch}, TP={args.tp} SP={'on' if args.sp else 'off'}, {args.dtype} on "
        f"{args.device}, attention {args.attention}, rank {args.rank} alpha {args.alpha}, "
        f"targets {','.join(args.targets)}; {args.rounds} rounds x {args.steps} steps after "
        f"{args.warmup} warm-up; ratios: medians [per-round min-max]; memory and bytes per rank"
    )


def machine_description(args: argparse.Namespace) -> dict[str, Any]:
    import megatron.core

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    desc = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_per_rank": torch.get_num_threads(),
        "ranks": dist.get_world_size(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
    }
    if args.device == "cuda":
        desc["gpu"] = torch.cuda.get_device_name()
    return desc


def write_outputs(rows: list[dict], args: argparse.Namespace, table: str) -> None:
    """JSON (everything, incl. each step's time and each collective), CSV (one line per
    method), the table as text, and the plot."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "machine": machine_description(args)}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    scalar = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    machine = ", ".join(f"{k} {v}" for k, v in meta["machine"].items())
    out.with_suffix(".md").write_text(f"Machine: {machine}\n\n{table}\n")
    if args.plot:
        plot(rows, out.with_suffix(".png"), describe_run(args))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Step time (median, quartile bars) and peak memory per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plot: matplotlib is missing (pip install matplotlib, or the `bench` extra)")
        return
    names = [r["method"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    med = [r["step_ms"] for r in rows]
    err = [
        [m - r["step_ms_p25"] for m, r in zip(med, rows, strict=True)],
        [r["step_ms_p75"] - m for m, r in zip(med, rows, strict=True)],
    ]
    a.bar(names, med, yerr=err, capsize=3)
    a.set_ylabel("step time, ms (median, p25-p75)")
    b.bar(names, [r["peak_mem_bytes"] / 2**20 for r in rows], color="tab:orange")
    b.set_ylabel("peak memory per rank, MiB")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument(
        "--targets", default=",".join(ALL_TARGETS), help="comma-separated megatron layer names"
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="floor, full, any preset or notation (lora, vera, vBuA, BA, vB~uA, ...), and "
        "hf_floor, hf_lora, hf_vera (transformers + PEFT peers; TP=1 only)",
    )
    p.add_argument("--hf-peers", action="store_true", help="append " + ",".join(HF_METHODS))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallel (needs --tp > 1)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--attention", choices=["sdpa", "local"], default="sdpa")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per rank (with more, OpenMP barriers make steps erratic when the "
        "cores are shared)",
    )
    p.add_argument("--out", default="", help="output stem: writes .json, .csv, .md (and .png)")
    p.add_argument("--plot", action="store_true", help="also write <out>.png (matplotlib)")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    if args.hf_peers:
        args.methods += [m for m in HF_METHODS if m not in args.methods]
    if args.sp and args.tp == 1:
        p.error("--sp needs --tp > 1")
    if any(m.startswith("hf_") for m in args.methods) and args.tp != 1:
        p.error("the hf_* peers run at TP=1 only")
    if args.plot and not args.out:
        p.error("--plot needs --out")
    return args


def init_distributed(args: argparse.Namespace) -> None:
    """Join the torchrun group, or make a one-rank group when run without torchrun."""
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(args.threads)
        from tiedlora_megatron.runtime import enable_cpu_runtime

        enable_cpu_runtime()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        with contextlib.closing(__import__("socket").socket()) as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if dist.get_world_size() != args.tp:
        raise SystemExit(f"run with {args.tp} ranks (DP = 1), got {dist.get_world_size()}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tp > 1 and "RANK" not in os.environ:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, f"--nproc-per-node={args.tp}", __file__, *sys.argv[1:]]
        os.execv(sys.executable, cmd)
    init_distributed(args)
    try:
        rows = run_benchmark(args)
        if dist.get_rank() == 0:
            table = format_table(rows, args)
            if args.out:
                write_outputs(rows, args, table)
            print(table, flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
