"""megatron-core on CPU with gloo: every redirect of its hard-coded CUDA calls, in one place.

megatron-core assumes a GPU in many places. `enable_cpu_runtime()` redirects them to the CPU. It
does nothing when `torch.cuda.is_available()`, and calling it again changes nothing.

Checked against megatron-core 0.16.1 and 0.19.2: every module and callable named below exists in
both with the same CUDA assumption (file names are 0.16's; 0.19 moved none), except the checkpoint
writer of redirect 5, which 0.19 rewrote (threads instead of forked processes) and which is
redirected per version. Every target is looked up defensively and checked by signature where its
arguments matter, so a release that lacks or changed one skips that redirect instead of crashing.

Five kinds of redirect, narrowest first (plus the MoE dispatchers' gloo redirects, in
`runtime/moe.py`):

1. `torch` inside selected megatron modules (`_DEVICE_LITERAL_MODULES`) is replaced by a copy of
   the torch module whose factory functions (`tensor`, `zeros`, `empty`, ...) map a CUDA `device`
   to the CPU and whose `autocast("cuda")` is `autocast("cpu")`. Everything else is torch itself.
   Why, per module (megatron file: what hard-codes CUDA):
   - `utils.py`: `local_multi_tensor_l2_norm` (the no-apex grad norm) returns a `device="cuda"`
     tensor.
   - `transformer/utils.py`: `get_default_causal_mask` / `get_sliding_window_causal_mask`
     (local attention's causal mask) build `device="cuda"` masks.
   - `pipeline_parallel/schedules.py`: `total_num_tokens` is `device="cuda"` (also at PP=1).
   - `pipeline_parallel/p2p_communication.py`: shape and receive buffers on the CUDA device.
   - `optimizer/optimizer.py`, `optimizer/grad_scaler.py`, `optimizer/distrib_optimizer.py`:
     `found_inf`, `_scale_one`, scales and gather buffers with `device='cuda'`.
   - `optimizer/clip_grads.py`: grad-norm and clip buffers with `device='cuda'`.
   - `distributed/param_and_grad_buffer.py`: a `device="cuda"` warm-up tensor.
   - `rerun_state_machine.py`: `_reduce_any` all-reduces a `device='cuda'` tensor.
   - `dist_checkpointing/strategies/state_dict_saver.py`, `dist_checkpointing/exchange_utils.py`:
     `device='cuda'` flags and exchange buffers.

2. The CUDA RNG in `tensor_parallel/random.py` becomes the CPU default generator:
   `_get_cuda_rng_state` / `_set_cuda_rng_state` (which reach `torch.cuda.default_generators`
   through the import-bound `_lazy_call`, a silent no-op without CUDA) are replaced there, and
   that module's `torch.cuda.get_rng_state` / `set_rng_state` / `manual_seed` (used by
   `CudaRNGStatesTracker.add` and `model_parallel_cuda_manual_seed`) act on the CPU generator.
   So the tracker keeps one state per name and per TP rank as on GPU, and `fork()` swaps the
   CPU generator's state in and out. Consequence: `model_parallel_cuda_manual_seed(seed)` also
   seeds the CPU generator with `seed` (on GPU it seeds the CUDA generator). Its "CPU RNG state
   changed within GPU RNG context" warning is then true by construction (the forked state *is*
   the CPU state), so a logging filter on that module drops that one message.

3. `Tensor.type()` / `Tensor.cuda()` inside a few megatron callables, via a scoped
   TorchFunctionMode: `type()` of a CPU tensor reads `torch.cuda.FloatTensor` etc. and `cuda()`
   returns the tensor. Wrapped (megatron file: why):
   - `optimizer/optimizer.py` `Float16OptimizerWithFloat16Params.__init__` and
     `optimizer/distrib_optimizer.py` `DistributedOptimizer.__init__`: raise TypeError unless
     `param.type()` is a `torch.cuda.*Tensor`.
   - `optimizer/clip_grads.py` `clip_grad_by_total_norm_fp32` (also bound by name in
     `optimizer/optimizer.py`): asserts `grad.type() == 'torch.cuda.FloatTensor'`.
   - `models/common/language_module/language_module.py`
     `LanguageModule.setup_embeddings_and_output_layer`: `weight.data.cuda()` for tied
     embeddings across pipeline stages.

4. Global `torch.cuda` shims, only because the names are called from too many megatron modules
   (and bound at import in some) to patch one by one. Without CUDA each of these raises, so
   replacing them cannot change a program that worked:
   - `current_device()` -> `torch.device("cpu")`: `GlobalMemoryBuffer` (utils.py), mappings.py,
     layers.py, tensor_parallel/utils.py, attention, p2p_communication, param_and_grad_buffer,
     distrib_optimizer, dist_checkpointing.
   - `synchronize()` -> no-op: p2p_communication, DDP, dist_checkpointing save
     (filesystem_async.py, tensor_aware_state_dict.py, fully_parallel.py).
   - `current_stream()`, `default_stream()`, `Stream`, `Event`, `stream()` -> inert stand-ins
     (CPU work is synchronous): DDP `communication_stream` and param_and_grad_buffer's
     `wait_stream` / `torch.cuda.stream(...)` with overlap_grad_reduce.

5. `dist_checkpointing` writes its files in the calling process, with no helper process.
   megatron-core 0.16 forks one writer process per file bucket
   (`FileSystemWriterAsync.write_preloaded_data_multiproc`) and collects their results through a
   spawned multiprocessing Manager (`_get_write_results_queue`). Forking a CPU rank while gloo's
   threads run can deadlock the child (seen: a save that never returned), and the Manager costs
   3-9 s per process and outlives the save. Both are replaced by a loop over the buckets in the
   calling process, which writes the same files. megatron-core 0.19 already writes with threads
   (`write_preloaded_data_multithread`) but still collects through a spawned Manager
   (`get_write_results_queue(mp_mode)`); there only the queue is replaced by a plain
   `queue.Queue`. megatron's async save (a background process) is not supported on this
   runtime. Each is left alone when the megatron version's signatures differ.

Quiet: on a CPU host megatron-core prints a dozen notices before a job's first line (Transformer
Engine and Apex are absent, deprecations of its own defaults, 0.19's GPTModel deprecation). None is
actionable there: torch fallbacks are what this runtime runs on. `quiet_megatron()` hides those
known ones (targeted message filters, not a blanket ignore) and `enable_cpu_runtime()` says so in
one line on rank 0. $TIEDLORA_VERBOSE=1 shows them all. Where CUDA is available neither hides
anything.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import queue
import re
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from tiedlora_megatron.runtime.moe import enable_moe_on_gloo

_CPU = torch.device("cpu")

_DEVICE_LITERAL_MODULES = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)

_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
)

_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

_ENABLED = False

#: Set to anything but "" or "0" to see the megatron-core notices that the CPU runtime hides.
VERBOSE_ENV = "TIEDLORA_VERBOSE"

# megatron-core's `warnings.warn` notices that a CPU host can do nothing about, as message
# prefixes (`warnings.filterwarnings` matches them case-insensitively from the start). Transformer
# Engine cannot be installed without CUDA, NVIDIA Apex is not on PyPI, and the rest warn about
# megatron's own defaults or modules. Seen with megatron-core 0.16.1 and 0.19.2.
_KNOWN_WARNINGS = (
    # optimizer/__init__.py, optimizer.py, clip_grads.py, megatron_fsdp/mixed_precision.py: import
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    # models/backends.py (import) and gpt_layer_specs.py (each local spec): WrappedTorchNorm
    r"Apex is not installed\. Falling back to Torch Norm",
    # TransformerConfig.__post_init__: megatron's own default cuda_graph_scope="full"
    r"full scope is deprecated\. ",
    # 0.19 hyper_comm_grid.py, at import
    r"absl\.logging is not installed\. ",
    # 0.19 models/mimo, at import (nothing here uses it)
    r"(MimoModelConfig|MimoModel|ModalitySubmodules) is experimental and still under ",
    # 0.16 dist_checkpointing/strategies/torch.py on torch >= 2.6, at every checkpoint load:
    # torch deprecating the calls megatron makes, nothing a user of this package can act on
    r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load`",
    r"Please use DTensor instead and we are deprecating ShardedTensor\.",
    # torch >= 2.9 deprecating collectives that megatron's MoE token dispatchers call (the
    # reduce-scatter under expert tensor parallelism)
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated\.",
)

# Notices megatron-core logs (logging, not warnings): logger name -> message prefix.
_KNOWN_LOG_RECORDS = {
    # 0.19, every GPTModel built: the layers matched here are the same in HybridModel
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    # 0.19, first checkpoint save: names megatron's async save, which this runtime does not use
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}


def _megatron_version() -> str | None:
    """The installed megatron-core's version, read without importing it (None if unknown)."""
    for name in ("megatron-core", "megatron_core"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _stale_deprecation_pattern(version: str | None) -> str | None:
    """Deprecations that promise removal "in megatron-core 0.N" for an N at or below the installed
    release: megatron kept the old name past its own date, so they say nothing to act on."""
    match = re.match(r"0\.(\d+)", version or "")
    if match is None:
        return None
    minors = "|".join(str(n) for n in range(int(match.group(1)), -1, -1))
    return rf".*will be\s+removed in\s+`?(megatron-core|mcore)`?\s+v?0\.({minors})\b"


def _known_warning_patterns() -> tuple[str, ...]:
    stale = _stale_deprecation_pattern(_megatron_version())
    return _KNOWN_WARNINGS + ((stale,) if stale else ())


class _DropLogRecord(logging.Filter):
    """Drops one logger's records that start with a known notice."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# One instance per logger: `Logger.addFilter` skips a filter it already holds (idempotent).
_LOG_FILTERS = {name: _DropLogRecord(prefix) for name, prefix in _KNOWN_LOG_RECORDS.items()}


def verbose() -> bool:
    """Whether $TIEDLORA_VERBOSE asks to see every megatron notice."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_megatron() -> bool:
    """Hide megatron-core's known CPU-host notices (`_KNOWN_WARNINGS`, `_KNOWN_LOG_RECORDS`, stale
    deprecations) where CUDA is unavailable, unless $TIEDLORA_VERBOSE is set. Call it before
    megatron is imported: most of them fire at import. Returns whether they are hidden.

    Where CUDA is available it changes nothing. Calling it again re-installs the same filters (a
    caller such as pytest may have reset `warnings.filters`), it never adds duplicates.
    """
    if torch.cuda.is_available() or verbose():
        return False
    for pattern in _known_warning_patterns():
        warnings.filterwarnings("ignore", message=pattern)
    for name, record_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(record_filter)
    return True


def summary_line(hidden: bool) -> str:
    """The one line that replaces megatron's notices: what the CPU runtime does."""
    version = _megatron_version()
    what = f"megatron-core {version}" if version else "megatron-core"
    if hidden:
        kinds = len(_known_warning_patterns()) + len(_KNOWN_LOG_RECORDS)
        notices = f"{kinds} known megatron notices hidden ({VERBOSE_ENV}=1 shows them)"
    else:
        notices = f"megatron's notices shown ({VERBOSE_ENV} is set)"
    return (
        f"CPU runtime: {what} on CPU (gloo), CUDA calls redirected, torch in place of "
        f"Transformer Engine/Apex; {notices}"
    )


def _announce(hidden: bool) -> None:
    """Print `summary_line` once per job: on rank 0 (or a process outside torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(summary_line(hidden), file=sys.stderr, flush=True)


def cpu_runtime_enabled() -> bool:
    """Whether `enable_cpu_runtime()` has installed the redirects in this process."""
    return _ENABLED


def enable_cpu_runtime() -> bool:
    """Redirect megatron-core's hard-coded CUDA calls to the CPU (see the module docstring).

    Returns True if the CPU runtime is (now) active, False where CUDA is available: there it
    patches nothing. Idempotent. The first activation hides megatron's known CPU-host notices
    (`quiet_megatron`) and prints one line saying what the runtime does (stderr, rank 0).
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    hidden = quiet_megatron()  # before the imports below: megatron warns at import
    cpu_torch = _cpu_torch()
    for name in _DEVICE_LITERAL_MODULES:
        module = _import(name)
        if module is not None and getattr(module, "torch", None) is torch:
            module.torch = cpu_torch
    _redirect_cuda_rng()
    _wrap_tensor_method_users()
    _install_cuda_shims()
    _write_checkpoints_in_process()
    enable_moe_on_gloo()
    _ENABLED = True
    _announce(hidden)
    return True


def _import(name: str) -> types.ModuleType | None:
    """Import a megatron module, or None where this megatron-core version lacks (or cannot import) it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _cpu_device(device: Any) -> Any:
    """The CPU for any way of naming a CUDA device ("cuda", "cuda:0", an index, torch.device)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


def _cpu_autocast(device_type: str = "cuda", *args: Any, **kwargs: Any) -> torch.autocast:
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _module_copy(module: types.ModuleType) -> types.ModuleType:
    """A module object with `module`'s attributes (also lazily loaded ones), to override a few."""
    copy = types.ModuleType(module.__name__, module.__doc__)
    copy.__dict__.update(module.__dict__)
    copy.__getattr__ = lambda name: getattr(module, name)  # PEP 562: names added after the copy
    return copy


def _cpu_torch() -> types.ModuleType:
    """`torch` with CUDA device arguments of factory functions mapped to the CPU."""
    cpu_torch = _module_copy(torch)
    for name in _FACTORIES:
        if hasattr(torch, name):
            setattr(cpu_torch, name, _on_cpu(getattr(torch, name)))
    cpu_torch.autocast = _cpu_autocast
    return cpu_torch


class _DropRngWarning(logging.Filter):
    """Drops megatron's CPU-RNG-changed warning, which is always true when the CUDA RNG is the CPU's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _redirect_cuda_rng() -> None:
    """Make megatron's CUDA RNG tracker and seeding use the CPU default generator."""
    random = _import("megatron.core.tensor_parallel.random")
    if random is None:
        return
    cuda = _module_copy(torch.cuda)
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    rng_torch = _module_copy(torch)
    rng_torch.cuda = cuda
    random.torch = rng_torch
    if hasattr(random, "_get_cuda_rng_state"):
        random._get_cuda_rng_state = _cpu_get_rng_state
    if hasattr(random, "_set_cuda_rng_state"):
        random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(random.__name__).addFilter(_DropRngWarning())


class _CudaTensorMethods(TorchFunctionMode):
    """`Tensor.type()` names CPU tensors as CUDA ones; `Tensor.cuda()` keeps them on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(args[0])
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device == _CPU else name
        return func(*args, **kwargs)


def _with_cuda_tensor_methods(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CudaTensorMethods():
            return fn(*args, **kwargs)

    return wrapper


def _wrap_method(module_name: str, class_name: str, method: str) -> None:
    cls = getattr(_import(module_name), class_name, None)
    if cls is not None and method in vars(cls):
        setattr(cls, method, _with_cuda_tensor_methods(vars(cls)[method]))


def _wrap_function(module_name: str, function: str, also_bound_in: tuple[str, ...]) -> None:
    """Wrap a module-level function where it is defined and where it was imported by name."""
    module = _import(module_name)
    original = getattr(module, function, None)
    if original is None:
        return
    wrapped = _with_cuda_tensor_methods(original)
    for name in (module_name, *also_bound_in):
        user = _import(name)
        if user is not None and getattr(user, function, None) is original:
            setattr(user, function, wrapped)


def _wrap_tensor_method_users() -> None:
    """Run the megatron callables that check `Tensor.type()` or call `.cuda()` under the mode."""
    _wrap_method(
        "megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"
    )
    _wrap_method("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__")
    _wrap_method(
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule",
        "setup_embeddings_and_output_layer",
    )
    _wrap_function(
        "megatron.core.optimizer.clip_grads",
        "clip_grad_by_total_norm_fp32",
        also_bound_in=("megatron.core.optimizer.optimizer", "megatron.core.optimizer"),
    )


class _CpuEvent:
    """Stands in for `torch.cuda.Event`: CPU work is done when issued."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """Stands in for `torch.cuda.Stream`: there is one, synchronous, CPU stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _CpuEvent | None = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _install_cuda_shims() -> None:
    """Replace the `torch.cuda` functions megatron calls everywhere (all raise without CUDA)."""
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.default_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent


_MULTIPROC_WRITE_ARGS = [
    "transform_list",
    "use_msc",
    "rank",
    "write_buckets",
    "global_results_queue",
]
_BUCKET_WRITE_ARGS = [
    "transform_list",
    "local_proc_idx",
    "write_bucket",
    "results_queue",
    "count_queue",
    "use_fsync",
    "kwargs",
]


def _write_checkpoints_in_process() -> None:
    """Write dist_checkpointing's file buckets without helper processes (redirect 5)."""
    fs = _import("megatron.core.dist_checkpointing.strategies.filesystem_async")
    writer = getattr(fs, "FileSystemWriterAsync", None)
    if writer is None:
        return
    if hasattr(fs, "_get_write_results_queue"):  # 0.16: forked writers + a Manager queue
        _write_buckets_in_process(fs, writer)
    elif hasattr(fs, "get_write_results_queue"):  # 0.19: writer threads + a Manager queue
        _collect_results_in_process(fs, writer)


def _write_buckets_in_process(fs: types.ModuleType, writer: type) -> None:
    """megatron-core 0.16: a loop over the buckets replaces the forked writer processes."""
    multiproc = list(inspect.signature(writer.write_preloaded_data_multiproc).parameters)
    bucket = list(inspect.signature(writer.write_preloaded_data).parameters)
    if multiproc != _MULTIPROC_WRITE_ARGS or bucket != _BUCKET_WRITE_ARGS:
        return
    write_bucket = writer.write_preloaded_data

    def write_buckets(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
        results: dict[int, Any] | Exception = {}
        local: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()  # the bucket writer takes one item and marks it done
        for i, item in enumerate(write_buckets):
            done.put(i)
            kwargs = {"use_msc": True} if use_msc else {}
            write_bucket(transform_list, i, item, local, done, True, **kwargs)
            index, written = local.get()
            if isinstance(written, Exception):
                results = written
                break
            results[index] = written
        global_results_queue.put(results)

    results_queue: queue.Queue = queue.Queue()
    fs._get_write_results_queue = lambda: results_queue
    writer.write_preloaded_data_multiproc = staticmethod(write_buckets)


def _collect_results_in_process(fs: types.ModuleType, writer: type) -> None:
    """megatron-core 0.19: the writers are threads already; a plain queue replaces the Manager's."""
    threaded = getattr(writer, "write_preloaded_data_multithread", None)
    if threaded is None or list(inspect.signature(threaded).parameters) != _MULTIPROC_WRITE_ARGS:
        return
    if list(inspect.signature(fs.get_write_results_queue).parameters) != ["mp_mode"]:
        return
    results_queue: queue.Queue = queue.Queue()
    fs.get_write_results_queue = lambda mp_mode="spawn": results_queue
