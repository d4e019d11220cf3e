"""Stopping on a signal without losing work: SIGTERM and SIGUSR1 (what SLURM sends ahead of a
time limit or a preemption, see `launch/slurm.sbatch`) make every rank finish its current step,
save a checkpoint and exit 0.

A signal may reach the ranks at different moments, or only some of them. The handler only notes
it; once per step every rank all-reduces the note (one integer, MAX), so all ranks stop after the
same step. While a checkpoint is written the signals are blocked in the main thread: processes
the writer forks or execs inherit the block and do not die of a signal sent to the whole process
group mid-save (multiprocessing's spawn clears it; none run between saves on this stack, seen
with `ps`), and the signal is noted as soon as the block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Within `with StopRequest(device) as stop:`, STOP_SIGNALS are noted instead of ending the
    process; `stop.agreed()` (collective) says whether any rank has received one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    def agreed(self) -> str | None:
        """Collective over all ranks: the name of a stop signal if any rank has received one."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        return signal.Signals(value).name if value else None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Block STOP_SIGNALS in this thread (and so in processes started inside) meanwhile."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
