"""Supervised fine-tuning data: examples from JSONL, token samples, padded batches, and a
deterministic batch schedule.

The loss is taken on answer tokens only, so a sample keeps its prompt and answer ids apart
until `collate` turns them into next-token `labels` and a `loss_mask`. The schedule is a pure
function of (seed, step): resuming at any step replays exactly the batches a run would have
seen, with no sampler state to checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from tiedlora_megatron.models.tokenizer import Tokenizer

Messages = list[dict[str, str]]
_ROLES = ("system", "user", "assistant")
_PLAIN_KEYS = {"input", "output", "references"}
_CHAT_KEYS = {"messages", "references"}
# Batches sorted together by length: large enough to group similar lengths, small enough that
# the batches of one epoch still mix the whole data set.
_BUCKET_BATCHES = 50


class DataError(ValueError):
    """Bad training or evaluation data, or a data request that cannot be met."""


@dataclass(frozen=True)
class Example:
    """One example before tokenisation.

    `prompt` is plain text or chat messages without the final assistant turn; `references` are
    the gold answers that metrics compare against (`(answer,)` when not given).
    """

    prompt: str | Messages
    answer: str
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.references:
            object.__setattr__(self, "references", (self.answer,))


def _check_messages(messages: Any, where: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f"{where}: message {i} must have exactly the keys 'role' and 'content'")
        if m["role"] not in _ROLES or not isinstance(m["content"], str):
            raise DataError(
                f"{where}: message {i} needs a role in {list(_ROLES)} and string content, "
                f"got role {m['role']!r}"
            )
    return messages


def _check_role_order(messages: Messages, where: str) -> None:
    """An optional leading system message, then user and assistant taking turns, starting with
    the user and ending with the assistant's answer (the one the loss is taken on)."""
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    turns = roles[start:]
    if not turns:
        raise DataError(
            f"{where}: only a system message; a user message and the assistant's "
            "answer must follow it"
        )
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            what = "a second system message" if role == "system" else f"role {role!r}"
            raise DataError(
                f"{where}: message {start + i} has {what} where {expected!r} belongs; messages "
                "must be an optional 'system' first, then 'user' and 'assistant' taking turns"
            )
    if turns[-1] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's answer (message "
            f"{len(roles) - 1} has role {turns[-1]!r})"
        )


def _parse_line(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    allowed = _CHAT_KEYS if "messages" in obj else _PLAIN_KEYS
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    refs = obj.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise DataError(f"{where}: 'references' must be a list of non-empty strings")
    if "messages" in obj:
        messages = _check_messages(obj["messages"], where)
        _check_role_order(messages, where)
        prompt: str | Messages = messages[:-1]
        answer = messages[-1]["content"]
    else:
        for key in ("input", "output"):
            if key not in obj:
                raise DataError(f"{where}: missing key {key!r} (or give 'messages')")
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: {key!r} must be a string")
        prompt, answer = obj["input"], obj["output"]
    if not answer.strip():
        raise DataError(f"{where}: empty output")
    return Example(prompt, answer, tuple(refs))


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples from a JSONL file: `{"input", "output"}` or `{"messages"}` lines, each with an
    optional `"references"` list. Blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    examples = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
                raise DataError(
                    f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                    "save the file as UTF-8"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                # A line is one JSON document: its column is the position within the line.
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.pos + 1})") from None
            examples.append(_parse_line(obj, where))
    if not examples:
        raise DataError(f"{p}: no examples")
    return examples


@dataclass(frozen=True)
class Sample:
    """A tokenised example; `index` is its position in the example list (for references)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    index: int

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def tokenize(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    *,
    template: Literal["plain", "chat"] = "plain",
    max_length: int,
) -> tuple[list[Sample], int]:
    """Samples of the examples at most `max_length` tokens long (prompt + answer + end token),
    and how many were dropped: truncating would cut the answer the loss is taken on.

    "plain" encodes the prompt as is and the answer after a space, ending with the first eos id;
    "chat" renders the prompt with the model's chat template (a plain prompt becomes one user
    message) and ends the answer with the end-of-turn id (`eos_token_ids[0]`).
    """
    if template not in ("plain", "chat"):
        raise DataError(f"unknown template {template!r}; use 'plain' or 'chat'")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if not tokenizer.eos_token_ids:
        raise DataError("the tokenizer has no eos token to end answers with")
    if template == "chat" and not tokenizer.has_chat_template:
        raise DataError("template='chat' needs a tokenizer with a chat template")
    end = tokenizer.eos_token_ids[0]
    samples, dropped = [], 0
    for i, ex in enumerate(examples):
        if template == "plain":
            if not isinstance(ex.prompt, str):
                raise DataError(f"example {i}: chat messages need template='chat'")
            prompt = tokenizer.encode(ex.prompt)
            answer = tokenizer.encode(" " + ex.answer) + [end]
        else:
            messages = (
                [{"role": "user", "content": ex.prompt}]
                if isinstance(ex.prompt, str)
                else ex.prompt
            )
            prompt = tokenizer.chat(messages, add_generation_prompt=True)
            answer = tokenizer.encode(ex.answer) + [end]
        if len(prompt) + len(answer) > max_length:
            dropped += 1
        else:
            samples.append(Sample(tuple(prompt), tuple(answer), i))
    return samples, dropped


def collate(
    samples: Sequence[Sample], pad_id: int, *, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """A right-padded batch for next-token training.

    `tokens` is each sequence but its last token, `labels` the sequence shifted by one, and
    `loss_mask` is 1.0 exactly where the label is an answer token (its end token included).
    Padded labels hold `pad_id` rather than an ignore index, since megatron's vocab-parallel
    cross entropy needs valid ids everywhere; the mask removes them. The batch is as wide as
    its longest sample (length - 1) or `pad_to`.
    """
    if not samples:
        raise DataError("cannot collate an empty batch")
    widths = [s.length - 1 for s in samples]
    width = max(widths)
    if pad_to is not None:
        if width > pad_to:
            worst = samples[widths.index(width)]
            raise DataError(
                f"sample {worst.index} needs {width} positions, longer than pad_to={pad_to}"
            )
        width = pad_to
    b = len(samples)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    for row, s in enumerate(samples):
        seq = torch.tensor(s.prompt_ids + s.answer_ids, dtype=torch.long)
        n = len(seq) - 1
        tokens[row, :n] = seq[:-1]
        labels[row, :n] = seq[1:]
        # labels[j] = seq[j + 1] is an answer token when j + 1 >= len(prompt).
        loss_mask[row, max(len(s.prompt_ids) - 1, 0) : n] = 1.0
    position_ids = torch.arange(width, dtype=torch.long).expand(b, width).clone()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
    }


class BatchSchedule:
    """Which samples make up each global batch, for every step of a run.

    Epoch e shuffles with `torch.Generator().manual_seed(seed + e)`. With `bucket`, the shuffled
    indices are grouped into chunks of ~50 global batches, each chunk sorted by length and cut
    into batches whose order is then shuffled: batches hold similar lengths (less padding) yet
    stay random. With `drop_last`, the remainder is left out of the shuffled order before
    bucketing, so the dropped samples are random ones, not the longest.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        global_batch: int,
        *,
        seed: int,
        shuffle: bool = True,
        bucket: bool = True,
        drop_last: bool = True,
    ) -> None:
        if global_batch < 1:
            raise DataError(f"global_batch must be positive, got {global_batch}")
        n = len(lengths)
        if n == 0 or (drop_last and n < global_batch):
            raise DataError(
                f"{n} samples make no global batch of {global_batch} (drop_last={drop_last})"
            )
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self.bucket = bucket
        self.drop_last = drop_last
        self.steps_per_epoch = n // global_batch if drop_last else math.ceil(n / global_batch)
        self._cached: tuple[int, list[list[int]]] | None = None

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        n, gb = len(self.lengths), self.global_batch
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n))
        if self.drop_last:
            order = order[: self.steps_per_epoch * gb]
        if self.bucket:
            chunk = _BUCKET_BATCHES * gb
            order = [
                i
                for start in range(0, len(order), chunk)
                for i in sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            ]
        batches = [order[k : k + gb] for k in range(0, len(order), gb)]
        if self.bucket and self.shuffle:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        self._cached = (epoch, batches)
        return batches

    def global_batch_indices(self, step: int) -> list[int]:
        """Sample indices of global batch `step` (counted over the whole run, across epochs)."""
        if step < 0:
            raise DataError(f"step must be non-negative, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        return list(self._epoch_batches(epoch)[k])

    def local_indices(self, step: int, dp_rank: int, dp_size: int) -> list[int]:
        """This data-parallel rank's contiguous share of global batch `step`.

        A short last batch (drop_last=False) is split as evenly as possible; some ranks may
        then get fewer samples, or none.
        """
        if self.global_batch % dp_size:
            raise DataError(
                f"global batch {self.global_batch} is not divisible by the data-parallel "
                f"size {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        batch = self.global_batch_indices(step)
        base, extra = divmod(len(batch), dp_size)
        start = dp_rank * base + min(dp_rank, extra)
        return batch[start : start + base + (dp_rank < extra)]
