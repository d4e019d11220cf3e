"""The SFT forward step: token losses on answer positions only, summed, for megatron's schedule.

The loss is summed over answer tokens and returned with their count, and the job sets
`calculate_per_token_loss`, so megatron divides the gradients once by the number of answer tokens
in the whole global batch (all micro-batches and data-parallel ranks): every token weighs the
same however the batch is split, which is what makes any layout match a single process.

Without sequence parallelism the output layer (a vocabulary-sized matmul, the largest of a small
model) runs only on the answer positions: a pre-hook on `output_layer` selects their hidden
states, and the labels handed to the model are the selected ones. Under sequence parallelism the
output layer's input is split over the sequence, so the full logits are computed and masked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tiedlora_megatron.pipeline import unwrap


class AnswerPositions:
    """Selects the answer positions' hidden states at the output layer of every last-stage chunk."""

    def __init__(self, chunks: Sequence[nn.Module]):
        self.index: torch.Tensor | None = None
        self.enabled = not any(unwrap(c).config.sequence_parallel for c in chunks)
        self._handles = []
        if self.enabled:
            for chunk in chunks:
                layer = getattr(unwrap(chunk), "output_layer", None)
                if layer is not None and unwrap(chunk).post_process:
                    self._handles.append(layer.register_forward_pre_hook(self._select))

    def _select(self, module: nn.Module, args: tuple) -> tuple | None:
        index, self.index = self.index, None  # armed for one forward by `labels_for`
        if index is None:
            return None
        hidden = args[0]  # [s, b, h]
        return (hidden.flatten(0, 1)[index].unsqueeze(1), *args[1:])

    def labels_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The labels to pass to the model for `batch`; arms the hook for its forward."""
        if not self.enabled:
            self.index = None
            return batch["labels"]
        # Hidden states are [s, b, h]: positions in sequence-major order.
        mask = batch["loss_mask"].t().reshape(-1)
        self.index = mask.nonzero().squeeze(1)
        return batch["labels"].t().reshape(-1)[self.index].unsqueeze(0)  # [1, n]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def make_forward_step(positions: AnswerPositions):
    """megatron's `forward_step_func` for batches from `tiedlora_megatron.data.collate`."""

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: nn.Module):
        batch = next(data_iterator)
        labels = positions.labels_for(batch)
        mask = batch["loss_mask"]
        output = model(batch["tokens"], batch["position_ids"], None, labels=labels)
        selected = positions.enabled

        def loss_func(token_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
            losses = token_losses.float()
            total = losses.sum() if selected else (losses * mask).sum()
            count = mask.sum().to(torch.int)
            report = torch.stack([total.detach().clone(), count.float()])
            return total, count, {"loss": report}

        return output, loss_func

    return forward_step


def reduce_losses(loss_dicts: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """[sum of answer-token losses, answer tokens] over the global batch, on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for d in loss_dicts:  # only the last pipeline stage has them
        total += d["loss"].to(device=device, dtype=torch.float64)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return total
