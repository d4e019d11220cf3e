"""The megatron-core API differences between the releases this package is tested on (0.16.1 and
0.19.2), each behind one small function. Everything else calls these instead of checking versions.

Features are detected (a parameter, a name, a file), never read from version strings, so a
release between or after the two takes whichever path its API offers. The CUDA redirects for CPU
runs live in `tiedlora_megatron.runtime.cpu`, not here (0.19 changed one: its checkpoint writer);
that 0.19 imports triton without declaring it is handled in `pyproject.toml`.

What 0.19 changed that this package uses:
- `dist_checkpointing` stores the common (non-sharded) state inside the torch-distributed files,
  as a `ShardedObject` named `common_state` pickled as `[state]`, instead of in `common.pt`
  (0.19 still reads a `common.pt` first where one exists: checkpoints written by 0.16).
- `dist_checkpointing.load` lost `common_strategy=` and always unpickles the common state, with
  torch-distributed's unrestricted (not weights-only) unpickler. 0.16 cannot load 0.19's
  checkpoints (it looks for `common.pt` only).
- `megatron.core.utils.get_te_version()` returns `Version("0.0.0")` instead of None where
  Transformer Engine cannot be imported.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from packaging.version import Version

#: The file megatron-core <= 0.18 writes the common state to (and 0.19 still reads first).
COMMON_STATE_FILE = "common.pt"
#: The key under which megatron-core >= 0.19 stores the common state inside the checkpoint.
_COMMON_STATE_KEY = "common_state"


def read_common_state(ckpt_dir: str | Path, unpickle: Callable[[io.BytesIO], Any]) -> dict:
    """A dist checkpoint's common (non-sharded) state, e.g. Megatron-LM's `args`; {} if none.

    `unpickle` turns the pickled bytes into objects, so the caller decides which classes may be
    loaded: megatron's own reader uses torch-distributed's unrestricted unpickler on 0.19.
    0.16 (and 0.19 for checkpoints that 0.16 wrote): the `common.pt` file. 0.19: the
    `common_state` object inside the checkpoint, read as raw bytes.
    """
    ckpt_dir = Path(ckpt_dir)
    legacy = ckpt_dir / COMMON_STATE_FILE
    if legacy.is_file():
        return unpickle(io.BytesIO(legacy.read_bytes()))
    stream = _embedded_common_state(ckpt_dir)
    if stream is None:
        return {}
    (state,) = unpickle(stream)  # megatron 0.19 pickles [state] (one ShardedObject's data)
    return state


def is_common_state_key(key: str) -> bool:
    """Whether a stored item's key is megatron-core's own common state: 0.19 stores it beside
    the tensors, as the object item `common_state/shard_0_1` (0.16 stores none)."""
    return key.split("/", 1)[0] == _COMMON_STATE_KEY


def _embedded_common_state(ckpt_dir: Path) -> io.BytesIO | None:
    """The pickled bytes of megatron >= 0.19's `common_state` object, or None without one."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing import ShardedObject
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    key = ShardedObject(_COMMON_STATE_KEY, None, (1,), (0,)).unique_key
    reader = dcp.FileSystemReader(str(ckpt_dir))
    if key not in reader.read_metadata().state_dict_metadata:
        return None

    class RawBytes(DefaultLoadPlanner):
        """Copies a byte item into the given buffer (the default planner unpickles it, and
        unrestricted)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn].write(value.read())

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load({key: buffer}, storage_reader=reader, planner=RawBytes(), no_dist=True)
    buffer.seek(0)
    return buffer


def load_dist_checkpoint(sharded_state_dict: dict, ckpt_dir: str | Path) -> dict:
    """`dist_checkpointing.load`, also of a checkpoint that the other tested release wrote.

    0.19 reads the common state of 0.16's checkpoints (`common.pt`) itself. 0.16 reads only
    `common.pt` and fails on 0.19's checkpoints; there a common-state strategy that falls back
    to the embedded state (unpickled weights-only, as 0.16 unpickles `common.pt`) is passed.
    """
    from megatron.core import dist_checkpointing

    if not _load_takes_common_strategy():
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir))
    return dist_checkpointing.load(
        sharded_state_dict, str(ckpt_dir), common_strategy=_either_layout_strategy()
    )


def load_without_common_state(sharded_state_dict: dict, ckpt_dir: str | Path) -> dict:
    """`dist_checkpointing.load` of the sharded tensors only, never unpickling the common state.

    Foreign checkpoints (Megatron-LM's, NeMo's) pickle training state there (optimizer, RNG,
    args, possibly classes of packages not installed here) that loading weights does not need.
    0.16: `load(common_strategy=...)` with a strategy that reads nothing. 0.19 has no such
    argument and reads the common state through `serialization.load_common_state_dict`, which
    is replaced by an empty reader for the duration of the call.
    """
    from megatron.core import dist_checkpointing

    if _load_takes_common_strategy():
        return dist_checkpointing.load(
            sharded_state_dict, str(ckpt_dir), common_strategy=_no_common_state_strategy()
        )
    with _common_state_skipped():
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir))


def _load_takes_common_strategy() -> bool:
    """Whether `dist_checkpointing.load` takes `common_strategy=` (0.16, not 0.19)."""
    from megatron.core import dist_checkpointing

    return "common_strategy" in inspect.signature(dist_checkpointing.load).parameters


def _no_common_state_strategy():
    """megatron-core 0.16: a common-state load strategy that reads nothing."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class NoCommonState(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir: str | Path) -> dict:
            return {}

    return NoCommonState()


def _either_layout_strategy():
    """megatron-core 0.16: a common-state load strategy that also reads 0.19's embedded state."""
    import torch
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class EitherLayout(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir: str | Path) -> dict:
            if (Path(checkpoint_dir) / COMMON_STATE_FILE).is_file():
                return super().load_common(checkpoint_dir)
            return read_common_state(
                checkpoint_dir, lambda b: torch.load(b, map_location="cpu", weights_only=True)
            )

    return EitherLayout()


@contextlib.contextmanager
def _common_state_skipped() -> Iterator[None]:
    """megatron-core 0.19: `load` reads the common state through this module-level function."""
    from megatron.core.dist_checkpointing import serialization

    original = serialization.load_common_state_dict
    serialization.load_common_state_dict = lambda checkpoint_dir: {}
    try:
        yield
    finally:
        serialization.load_common_state_dict = original


def installed_te_version() -> Version | None:
    """The installed Transformer Engine version, or None where TE cannot be imported.

    megatron-core's `get_te_version()` says "no TE" as None on 0.16 and as `Version("0.0.0")` on
    0.19 (no TE release has that number)."""
    from megatron.core.utils import get_te_version

    version = get_te_version()
    return None if version is None or version == Version("0.0.0") else version
