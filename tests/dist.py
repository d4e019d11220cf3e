"""A pool of gloo ranks that lives for one test module.

Starting ranks and importing megatron-core costs seconds per process, so each test module starts
its ranks once (`ProcessGroupPool` as a module-scoped fixture) and sends them one function per
check. A function runs on every rank and its return values come back in rank order; an exception
on any rank fails the calling test with that rank's traceback.

Functions sent to the pool must be importable by name (module-level in a test module).
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

#: Seconds a check may take on a rank; raise it on a slow or loaded machine.
_TIMEOUT_ENV = "TIEDLORA_TEST_RANK_TIMEOUT"
_TIMEOUT_S = float(os.environ.get(_TIMEOUT_ENV, "300"))
_FAILED_GRACE_S = 20.0


def _worker(rank: int, world_size: int, store_file: str, inbox, outbox) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from tiedlora_megatron.runtime import enable_cpu_runtime

    enable_cpu_runtime()
    # A file store, not a TCP port: a free port picked here can be taken by another process
    # (another test run) before the ranks bind it.
    dist.init_process_group(
        "gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size
    )
    parent = os.getppid()
    try:
        while True:
            try:
                job = inbox.get(timeout=5)
            except queue.Empty:
                if os.getppid() != parent:  # the test process died: do not linger
                    break
                continue
            if job is None:
                break
            fn, args, kwargs = job
            try:
                result = fn(*args, **kwargs)
                pickle.dumps(result)  # an unpicklable result would be lost in the queue's thread
                _release_model_parallel_groups()
                outbox.put((rank, True, result))
            except BaseException:  # noqa: BLE001 - reported to the parent
                outbox.put((rank, False, traceback.format_exc()))
    finally:
        # Exit without destroy_process_group: after DDP and optimizer runs gloo's shutdown was
        # seen spinning for over 30 s per rank, and the process ends here anyway. Flush the
        # results first: os._exit skips the queue's feeder thread.
        outbox.close()
        outbox.join_thread()
        os._exit(0)


def _release_model_parallel_groups() -> None:
    """Destroy the process groups left behind once a job has torn megatron's parallel state
    down. `destroy_model_parallel` only forgets its groups, and each gloo group keeps its
    threads: about 100 per rank for every `initialize_model_parallel`, which slowed a module's
    later tests (and subprocesses) several-fold on two cores."""
    import gc

    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return  # a job that keeps its groups for the next one
    from torch.distributed.distributed_c10d import GroupMember, _world

    for group in list(_world.pg_map):
        if group is not GroupMember.WORLD:
            dist.destroy_process_group(group)
    gc.collect()  # the groups' threads stop when the last reference goes, some in cycles


class ProcessGroupPool:
    """`world_size` spawned processes joined in one gloo process group."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._closed_by: str | None = None
        ctx = mp.get_context("spawn")
        self._store_dir = tempfile.TemporaryDirectory(prefix="tiedlora-pool-")
        store_file = os.path.join(self._store_dir.name, "store")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, store_file, self._inboxes[rank], self._outbox),
                # Not daemonic: dist_checkpointing.save starts a multiprocessing Manager.
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return the results in rank order."""
        if self._closed_by is not None:  # one line, not the first failure's traceback again
            raise RuntimeError(
                f"{fn.__name__}: not run: this module's ranks were stopped after {self._closed_by}"
            )
        for inbox in self._inboxes:
            inbox.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        failures: list[str] = []
        for _ in range(self.world_size):
            # Once a rank has failed, the others are likely stuck in a collective: give them a
            # short grace period, then report the failure rather than the hang.
            timeout = _FAILED_GRACE_S if failures else _TIMEOUT_S
            try:
                rank, ok, value = self._outbox.get(timeout=timeout)
            except Exception as e:  # queue.Empty: a rank hung or died
                self.close(force=True)
                if failures:
                    self._closed_by = f"{fn.__name__} failed"
                    raise AssertionError(
                        f"{fn.__name__} failed (other ranks then hung):\n" + "\n".join(failures)
                    ) from None
                self._closed_by = f"{fn.__name__} timed out"
                raise RuntimeError(
                    f"{fn.__name__}: a rank gave no result in {timeout:.0f} s (a loaded or slow "
                    f"machine? set {_TIMEOUT_ENV} to more seconds, e.g. {_TIMEOUT_ENV}=900)"
                ) from e
            if ok:
                results[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
        if failures:
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(failures))
        return [results[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not force:
            for inbox in self._inboxes:
                inbox.put(None)
        for p in self._procs:
            p.join(timeout=0 if force else 30)
            if p.is_alive():
                p.kill()
                p.join()
        self._store_dir.cleanup()

    def __enter__(self) -> ProcessGroupPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(force=exc[0] is not None)
