"""Fine-tuning data: JSONL examples, tokenised samples with answer-only loss masks, padded
batches, a resumable batch schedule, built-in offline tasks and their metrics.

    examples = get_task("squad").load("train")         # or load_jsonl("my_data.jsonl")
    samples, dropped = tokenize(examples, tok, template="plain", max_length=320)
    schedule = BatchSchedule([s.length for s in samples], global_batch=8, seed=1234)
    batch = collate([samples[i] for i in schedule.local_indices(step, dp_rank, dp_size)],
                    tok.pad_id)
    score("squad", predictions, [examples[s.index].references for s in eval_samples])
    clean_answer("\nThe answer is: Paris", short=True)  # "Paris": what is scored
    squad_prompt(context, question)                      # the squad task's prompt, for new data

Optional dependencies: the gsm task needs `reasoning-gym`; SQuAD is fetched once with pip
(see `tasks.squad_json`).
"""

from tiedlora_megatron.data.metrics import (
    METRIC_SETS,
    clean_answer,
    exact_match,
    example_scores,
    f1,
    normalize_answer,
    numeric_accuracy,
    score,
    score_metrics,
    strip_preamble,
)
from tiedlora_megatron.data.sft import (
    BatchSchedule,
    DataError,
    Example,
    Sample,
    collate,
    load_jsonl,
    tokenize,
)
from tiedlora_megatron.data.tasks import (
    SPLITS,
    TASKS,
    TaskSpec,
    data_dir,
    get_task,
    gsm,
    gsm_prompt,
    squad,
    squad_json,
    squad_prompt,
)

__all__ = [
    "METRIC_SETS",
    "SPLITS",
    "TASKS",
    "BatchSchedule",
    "DataError",
    "Example",
    "Sample",
    "TaskSpec",
    "clean_answer",
    "collate",
    "data_dir",
    "exact_match",
    "example_scores",
    "f1",
    "get_task",
    "gsm",
    "gsm_prompt",
    "load_jsonl",
    "normalize_answer",
    "numeric_accuracy",
    "score",
    "score_metrics",
    "squad",
    "squad_json",
    "squad_prompt",
    "strip_preamble",
    "tokenize",
]
