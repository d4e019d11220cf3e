"""One job per output directory: an advisory lock on `<output_dir>/.lock`, and decisions rank 0
makes for every rank.

Rank 0 takes the lock (`fcntl.flock`) before anything is written to the directory and writes
its holder into the file: host, PID and start time. A second job's rank 0 fails at once with a
message naming that holder, and its other ranks with it (the outcome is broadcast). The kernel
drops the lock when its process dies, however it dies; a lock file that still names a holder
but can be taken is therefore stale (its job died) and is taken over with a log line. On a
filesystem without `flock` the holder in the file decides: a live process on this host, or any
process on another host, keeps the directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from tiedlora_megatron.config import ConfigError
from tiedlora_megatron.finetune.progress import is_rank0, log

LOCK_FILE = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

T = TypeVar("T")


def on_rank0(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and return its result on every rank. When it raises, every rank
    raises: a ConfigError or CheckpointError with rank 0's message as that type, anything else
    as a CollectiveError naming it (so no rank waits for the others)."""
    from tiedlora_megatron.atomic import CollectiveError
    from tiedlora_megatron.checkpoint import CheckpointError

    result, error = None, None
    if is_rank0():
        try:
            result = fn()
        except Exception as e:  # every rank must hear of it
            error = e
    box: list[Any] = [(result, None if error is None else (type(error).__name__, str(error)))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, failure = box[0]
    if failure is not None:
        kind = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}
        name, message = failure
        if name in kind:
            raise kind[name](message)
        raise CollectiveError(f"rank 0 failed: {name}: {message}")
    return result


def _holder_text(holder: dict[str, Any]) -> str:
    return (
        f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, "
        f"since {holder.get('since', '?')}"
    )


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    if not data.strip():
        return None
    try:
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"host": "?", "pid": "?", "since": "? (unreadable lock file)"}
    return holder if isinstance(holder, dict) else None


def _alive_here(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it runs
    try:
        os.kill(int(holder.get("pid")), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """The advisory lock on a job's output directory (rank 0 holds it)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise a ConfigError naming its holder."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock = True
            except BlockingIOError:
                raise self._in_use(_read_holder(fd) or {}) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                flock = False
            previous = _read_holder(fd)
            if previous is not None and not flock and _alive_here(previous):
                raise self._in_use(previous, " (this filesystem has no flock: delete the lock "
                                             "file if that job is gone)")  # fmt: skip
            if previous is not None:
                log(
                    f"{self.path}: taking over a stale lock ({_holder_text(previous)}; that job "
                    "ended without releasing it)"
                )
            holder = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def check_free(self) -> None:
        """Raise what `acquire` would if another job holds the lock now; creates nothing and
        takes nothing (the pre-launch check, so a busy directory fails before torchrun)."""
        if not self.path.is_file():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(_read_holder(fd) or {}) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
        finally:
            os.close(fd)  # closing drops the shared lock

    def _in_use(self, holder: dict[str, Any], note: str = "") -> ConfigError:
        return ConfigError(
            f"train.output_dir {self.output_dir} is in use by another job ({_holder_text(holder)};"
            f" lock {self.path}){note}: wait for it to finish or stop it, or choose another "
            "train.output_dir"
        )

    def release(self) -> None:
        """Clear the holder and drop the lock (a cleared file marks a clean release)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)
