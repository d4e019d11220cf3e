"""Copy one file out of a large .tar.gz with a progress line.

SQuAD v1.1 comes out of the 358 MB bigbench sdist (`tasks.squad_json`). A .tar.gz has no index:
finding one member means decompressing everything before it, tens of seconds on a small machine,
which looked like a hang without a word. `extract_member` says what it unpacks, how far through
the archive it is every few seconds (rate and an upper bound on the time left: the member may
come before the end), and when it is done.
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import TextIO

from tiedlora_megatron.data.sft import DataError

#: Seconds between two progress lines while reading through an archive.
PROGRESS_EVERY_S = 5.0

_MIB = 2**20


def _progress_line(label: str, done: int, total: int, elapsed: float) -> str:
    rate = done / max(elapsed, 1e-9)
    left = (total - done) / rate if rate > 0 else float("inf")
    return (
        f"{label}: {done / _MIB:,.0f}/{total / _MIB:,.0f} MiB read, {rate / _MIB:.1f} MiB/s, "
        f"at most {left:.0f} s left"
    )


def extract_member(
    archive: Path,
    member: str,
    target: Path,
    *,
    every_s: float = PROGRESS_EVERY_S,
    out: TextIO | None = None,
) -> None:
    """Copy `member` of the .tar.gz `archive` to `target` atomically (a reader never sees half a
    file), printing progress to `out` (stderr) every `every_s` seconds while reading through the
    archive. Raises DataError if the archive lacks the member or cannot be read."""
    out = sys.stderr if out is None else out
    archive, target = Path(archive), Path(target)
    total = archive.stat().st_size
    label = f"unpacking {Path(member).name} from {archive.name}"
    print(f"{label} ({total / _MIB:,.0f} MiB to read through at most) ...", file=out, flush=True)
    start = last = time.monotonic()
    try:
        with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:gz") as tf:
            for info in tf:
                now = time.monotonic()
                if now - last >= every_s:
                    last = now
                    print(
                        _progress_line(label, raw.tell(), total, now - start), file=out, flush=True
                    )
                if info.name == member and info.isfile():
                    data = tf.extractfile(info).read()
                    break
            else:
                raise DataError(f"{archive} has no {member}")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(
            f"{archive} is not a readable .tar.gz ({e}); delete it to fetch it again"
        ) from None
    # A unique temporary name: ranks sharing a cache directory may extract at the same time.
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name, delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)  # a cache others may read, not mkstemp's 0600
    os.replace(f.name, target)
    took = time.monotonic() - start
    print(f"{label}: done in {took:.0f} s ({len(data) / _MIB:.1f} MiB)", file=out, flush=True)
