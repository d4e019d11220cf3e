"""The fine-tuning job: YAML config + overrides, SFT data, megatron-core training, evaluation.

    torchrun --nproc-per-node 2 -m tiedlora_megatron.finetune train --config examples/configs/smollm2_squad.yaml

`config` holds the job's documented configuration and its up-front checks, `job` the training
loop on megatron-core (with `build`: process groups, model, optimizer; `batches`: data;
`evaluation`; `checkpoints`: scan, prune, resume choice and contract; `outdir`: the output
directory's lock; `preemption`: SIGTERM / SIGUSR1), `loss` the masked SFT forward step,
`progress` logging.
"""

from tiedlora_megatron.finetune.checks import validate
from tiedlora_megatron.finetune.config import JobConfig, load_job_config

__all__ = ["JobConfig", "load_job_config", "validate"]
