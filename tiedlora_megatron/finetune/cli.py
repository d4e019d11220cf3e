"""Command line of the fine-tuning job.

    torchrun --nproc-per-node 2 -m tiedlora_megatron.finetune train --config job.yaml parallel.tp=2
    python -m tiedlora_megatron.finetune eval --config job.yaml --adapter runs/x/checkpoints/step_0000100
    python -m tiedlora_megatron.finetune eval --config job.yaml --data qa.jsonl --metric exact
    python -m tiedlora_megatron.finetune show --config job.yaml train.steps=10
    python -m tiedlora_megatron.finetune show --check --nproc 8 --config job.yaml

Everything after the options is a `key=value` override of the YAML. The configuration is checked
before any process group starts, so mistakes fail in seconds with a message naming them;
`show --check` runs every check a launch can make in one process (the launch scripts run it
before torchrun).

Errors: every known failure (config, data, checkpoint, export, file system, a collective that
failed because a peer did) ends the process with exit status 2 and one line
`tiedlora-finetune: error: ...`, printed once per job by whichever rank fails first (they agree
through torchrun's rendezvous store). A rank whose error is only the consequence of a peer's
failure prints nothing. TIEDLORA_DEBUG=1 adds every rank's Python traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from tiedlora_megatron.config import ConfigError

PROG = "tiedlora-finetune"
#: Exit status of every reported failure.
EXIT_ERROR = 2
#: How long a rank whose error is a consequence of another's waits for that rank's report.
CONSEQUENCE_WAIT_S = 20.0
#: How long a rank that lost the race to report waits for the winner to finish printing.
PRINTED_WAIT_S = 30.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Tied-LoRA fine-tuning on megatron-core."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "fine-tune (resumes from the output directory's newest checkpoint)"),
        ("eval", "score the base model, or base + adapter, on the held-out split or --data FILE"),
        ("show", "print the resolved configuration (or --check it) and exit"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML job configuration (default: built-in defaults)")
        if name == "eval":
            p.add_argument("--adapter", help="adapter checkpoint directory (omit: base model)")
            p.add_argument(
                "--data",
                metavar="FILE.jsonl",
                help="score this JSONL file ({input, output[, references]} or chat {messages}"
                " lines) instead of the job's held-out split: no task or training file needed, "
                "every example scored; writes <train.output_dir>/eval/<file stem>/<base | "
                "checkpoint name>/result.json and predictions.jsonl (config key eval.data)",
            )
            p.add_argument(
                "--metric",
                choices=("squad", "exact", "number"),
                help="with --data: squad (exact match and F1, the default), exact (exact match) "
                "or number (last number equals the reference), on the answer's first line "
                "without an 'Answer:' preamble (config key eval.metric)",
            )
        if name == "show":
            p.add_argument(
                "--check",
                action="store_true",
                help="run every pre-launch check (layout, optimizer, data files, validation "
                "split, output directory) and print 'config OK' or the error",
            )
            p.add_argument(
                "--nproc",
                type=int,
                default=None,
                help="processes the job will run on (default: $WORLD_SIZE or 1)",
            )
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")
    return parser


# ---- one error path ------------------------------------------------------------------------------


def _debug() -> bool:
    return os.environ.get("TIEDLORA_DEBUG", "") not in ("", "0")


def _is_consequence(error: BaseException) -> bool:
    """True for errors that only say a peer failed: a collective that broke off, rank 0's
    broadcast failure (CollectiveError), a closed connection to the store."""
    collective = getattr(sys.modules.get("tiedlora_megatron.atomic"), "CollectiveError", None)
    if collective is not None and isinstance(error, collective):
        return True
    dist = sys.modules.get("torch.distributed")
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    if type(error) is RuntimeError:
        text = str(error).lower()
        return any(
            marker in text
            for marker in ("gloo", "nccl", "connection closed by peer", "connection reset by peer",
                           "broken pipe", "socket timeout")
        )  # fmt: skip
    return False


def _checkpoint_failure(error: BaseException) -> BaseException:
    """torch.distributed.checkpoint wraps each rank's failure (with its traceback) in a
    CheckpointException; the first wrapped exception is the one worth reporting."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return inner
    return error


def failure_message(error: BaseException) -> str | None:
    """The one-line report of a known failure, or None for an unknown one (a bug: traceback)."""
    known: list[type] = [ConfigError, OSError, UnicodeError]
    for module, name in (
        ("tiedlora_megatron.atomic", "CollectiveError"),
        ("tiedlora_megatron.data", "DataError"),
        ("tiedlora_megatron.checkpoint", "CheckpointError"),
        ("tiedlora_megatron.export", "ExportError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            known.append(cls)
    dcp = sys.modules.get("torch.distributed.checkpoint.api")
    if dcp is not None and isinstance(error, dcp.CheckpointException):
        inner = _checkpoint_failure(error)
        first = str(inner).strip().splitlines()
        detail = f"{type(inner).__name__}: {first[0]}" if first else type(inner).__name__
        return f"distributed checkpoint I/O failed: {detail}"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
        return f"{where}: {error.strerror}"
    if isinstance(error, UnicodeDecodeError):
        return f"cannot decode text as {error.encoding}: {error.reason} at byte {error.start}"
    if isinstance(error, tuple(known)):
        text = str(error).strip() or type(error).__name__
        if isinstance(error, (OSError, UnicodeError)):
            text = f"{type(error).__name__}: {text}"
        return text
    if _is_consequence(error):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return f"a collective failed, most likely because another rank did: {first}"
    return None


class _Reporter:
    """Decides which rank reports a failure: the first to claim it. Ranks of a one-node job
    claim a marker file named after their torchrun agent (no torch import on this path); a
    multi-node job claims a key in torchrun's rendezvous store, which every node reaches. A
    plain single process always reports."""

    def __init__(self) -> None:
        env = os.environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        run = env.get("TORCHELASTIC_RUN_ID", "")
        self.key = f"tiedlora/error/{run}/{restart}"
        self.store = None
        self.marker = None
        if self.world <= 1:
            return
        if env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
            # TORCHELASTIC_ERROR_FILE is .../attempt_N/<local rank>/error.json: the attempt's
            # own folder, shared by this agent's workers only.
            attempt = os.path.dirname(os.path.dirname(env.get("TORCHELASTIC_ERROR_FILE", "")))
            if attempt and os.path.isdir(attempt):
                self.marker = os.path.join(attempt, "tiedlora-error")
            else:
                import tempfile

                name = f"tiedlora-error-{os.getuid()}-{os.getppid()}-{run}-{restart}"
                self.marker = os.path.join(tempfile.gettempdir(), name.replace(os.sep, "_"))
            return
        try:
            from datetime import timedelta

            from torch.distributed import TCPStore

            self.store = TCPStore(
                env["MASTER_ADDR"],
                int(env["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=10),
            )
        except Exception:  # no store to reach: rank 0 reports
            self.store = None

    def claim(self) -> bool:
        """True for exactly one rank of the job: the first to call it."""
        if self.world <= 1:
            return True
        try:
            if self.marker is not None:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                return True
            if self.store is not None:
                return self.store.add(self.key + "/claims", 1) == 1
        except FileExistsError:
            return False
        except Exception:
            pass
        return os.environ.get("RANK", "0") == "0"

    def printed(self) -> None:
        """Tell the other ranks that the report is out."""
        try:
            if self.marker is not None:
                os.close(os.open(self.marker + ".printed", os.O_CREAT | os.O_WRONLY, 0o600))
            elif self.store is not None:
                self.store.set(self.key, "1")
        except Exception:
            pass

    def wait_printed(self, wait_s: float) -> bool:
        """True once another rank has reported, False after `wait_s` seconds without."""
        import time

        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.marker is not None:
                    if os.path.exists(self.marker + ".printed"):
                        return True
                elif self.store is not None:
                    if self.store.check([self.key]):
                        return True
                else:
                    return False
            except Exception:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def report(error: BaseException) -> int:
    """Report `error` once per job; return the exit status."""
    message = failure_message(error)
    rank = os.environ.get("RANK")
    if _debug():
        prefix = f"[rank {rank}] " if rank is not None else ""
        text = "".join(traceback.format_exception(error))
        print("".join(prefix + line + "\n" for line in text.splitlines()), file=sys.stderr, end="")
    reporter = _Reporter()
    if message is not None and _is_consequence(error) and reporter.wait_printed(CONSEQUENCE_WAIT_S):
        return EXIT_ERROR  # a peer failed first and has said why
    if reporter.claim():
        if message is None:  # a bug: its traceback is the report
            if not _debug():
                traceback.print_exception(error, file=sys.stderr)
        else:
            print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        reporter.printed()
    else:  # let the reporting rank finish before torchrun ends it
        reporter.wait_printed(PRINTED_WAIT_S)
    return EXIT_ERROR if message is not None else 1


# ---- commands ------------------------------------------------------------------------------------


def _show(args, cfg) -> int:
    if args.check:
        from tiedlora_megatron.finetune.preflight import preflight

        preflight(cfg, args.nproc)
        print("config OK")
        return 0
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _run(args) -> int:
    from tiedlora_megatron.finetune.checks import validate
    from tiedlora_megatron.finetune.config import load_job_config

    cfg = load_job_config(args.config, args.overrides)
    if args.command == "show":
        return _show(args, cfg)
    if args.command == "eval":  # the flags win over the config keys
        cfg.eval.data = args.data if args.data is not None else cfg.eval.data
        cfg.eval.metric = args.metric if args.metric is not None else cfg.eval.metric
    validate(cfg, command=args.command)

    from tiedlora_megatron.runtime import quiet_megatron

    quiet_megatron()  # CPU hosts only; before `job` imports megatron, which warns at import
    from tiedlora_megatron.finetune import job

    try:
        if args.command == "train":
            job.train(cfg)
        elif cfg.eval.data is not None:
            from tiedlora_megatron.finetune.evaluation import evaluate_file

            evaluate_file(cfg, args.adapter)
        else:
            job.evaluate_checkpoint(cfg, args.adapter)
    except Exception as e:
        code = report(e)  # first: tearing process groups down may hang
        if not _is_consequence(e):  # with a dead peer it would
            with contextlib.suppress(Exception):
                job.shutdown()
        return code
    job.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as e:  # not KeyboardInterrupt / SystemExit
        return report(e)
