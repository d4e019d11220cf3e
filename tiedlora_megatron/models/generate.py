"""Evaluation-time forward passes for loaded models: logits, perplexity and generation.

The forward runs this rank's model chunks in pipeline order with plain point-to-point sends
(inference needs no schedule), so it works at any TP / PP / virtual-PP size on gloo and NCCL.
Batches are left-padded: padded keys are masked explicitly, learned positions count only real
tokens, and RoPE models need no position shift (attention scores depend only on relative
position). Generation keeps a KV cache in megatron's `StaticInferenceContext`.

Under sequence parallelism every forward's sequence length must be a multiple of the TP size
(each rank holds its share of the tokens): batches are left-padded to such a width, and
generation recomputes the whole padded sequence at each new token instead of keeping a cache
(a one-token decode step cannot be split over the TP ranks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def attention_mask(real: torch.Tensor, query_len: int) -> torch.Tensor:
    """Megatron's boolean mask (True = masked), [b, 1, query_len, keys], for the last queries.

    `real` is [b, keys], True where a key is a real (not padding) token.
    """
    keys = real.shape[1]
    q_pos = torch.arange(keys - query_len, keys).unsqueeze(1)
    future = torch.arange(keys).unsqueeze(0) > q_pos
    return (future.unsqueeze(0) | ~real.unsqueeze(1)).unsqueeze(1)


def position_ids(real: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (padding gets 0), as HF does for left padding."""
    return (real.long().cumsum(-1) - 1).clamp(min=0)


def pipeline_forward(
    chunks: Sequence,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    inference_context=None,
) -> torch.Tensor | None:
    """Full-vocabulary (padded) logits [b, s, V] on the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state as ps

    logits = None
    for model in chunks:
        config = model.config
        if not model.pre_process:
            tokens = input_ids.shape[1] // sequence_multiple(chunks)  # this rank's share
            shape = (tokens, input_ids.shape[0], config.hidden_size)
            hidden = torch.empty(shape, dtype=config.params_dtype)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(
            input_ids,
            positions,
            mask,
            inference_context=inference_context,
            runtime_gather_output=True,
        )
        if model.post_process:
            logits = out
        else:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    return logits


def _broadcast_from_last_stage(t: torch.Tensor | None, shape, dtype) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    buf = t if t is not None else torch.empty(shape, dtype=dtype)
    dist.broadcast(
        buf,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
    )
    return buf


def sequence_multiple(chunks: Sequence) -> int:
    """What every forward's sequence length must be a multiple of: the TP size under sequence
    parallelism, else 1."""
    config = chunks[0].config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def _check_length(chunks: Sequence, length: int) -> None:
    limit = chunks[0].max_sequence_length
    if length > limit:
        raise ValueError(f"sequences of {length} tokens exceed the model's {limit} positions")


def _left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, real) of `seqs` left-padded to a common width, a multiple of `multiple`."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        real[i, width - len(s) :] = True
    return ids, real


@torch.no_grad()
def forward_logits(
    chunks: Sequence, seqs: Sequence[Sequence[int]], vocab_size: int, pad_id: int = 0
) -> torch.Tensor | None:
    """Logits [b, s, vocab_size] of left-padded `seqs` on the last pipeline stage, else None."""
    _check_length(chunks, max(map(len, seqs), default=0))
    ids, real = _left_pad(seqs, pad_id, sequence_multiple(chunks))
    logits = pipeline_forward(chunks, ids, position_ids(real), attention_mask(real, ids.shape[1]))
    return None if logits is None else logits[..., :vocab_size].float()


@torch.no_grad()
def perplexity(chunks: Sequence, seqs: Sequence[Sequence[int]], vocab_size: int) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `seqs`, on every rank."""
    logits = forward_logits(chunks, seqs, vocab_size)
    stats = None
    if logits is not None:
        ids, real = _left_pad(seqs, 0, sequence_multiple(chunks))
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        keep = real[:, :-1] & real[:, 1:]
        stats = torch.stack([nll[keep].sum(), keep.sum().double()]).double()
    stats = _broadcast_from_last_stage(stats, (2,), torch.float64)
    return math.exp(stats[0].item() / stats[1].item())


def _choose(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    chunks: Sequence,
    prompts: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Greedy (temperature 0) or sampled continuations of a batch of token-id prompts.

    Every rank of the model-parallel group must call this with the same arguments; every rank
    gets the same result. A continuation stops after its first eos token (which it includes).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    multiple = sequence_multiple(chunks)
    ids, real = _left_pad(prompts, pad_id, multiple)
    batch = ids.shape[0]
    _check_length(chunks, max(map(len, prompts)) + max_new_tokens)
    context = None if multiple > 1 else StaticInferenceContext(batch, ids.shape[1] + max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    step_ids, step_pos = ids, position_ids(real)
    for _ in range(max_new_tokens):
        mask = attention_mask(real, step_ids.shape[1])
        logits = pipeline_forward(chunks, step_ids, step_pos, mask, inference_context=context)
        if context is not None:
            context.sequence_len_offset += step_ids.shape[1]
            context.enable_decode_mode()
        nxt = None
        if logits is not None:
            nxt = _choose(logits[:, -1, :vocab_size].float(), temperature, top_k, top_p, gen)
        nxt = _broadcast_from_last_stage(nxt, (batch,), torch.long)
        for i in range(batch):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        real = torch.cat([real, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
        if context is not None:
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt.unsqueeze(1)
            continue
        # no cache: the whole sequence again, left-padded to the next multiple
        ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
        lead = int((~real).all(0).long().cumprod(0).sum())  # padding in every row
        pad = -(ids.shape[1] - lead) % multiple
        ids = F.pad(ids[:, lead:], (pad, 0), value=pad_id)
        real = F.pad(real[:, lead:], (pad, 0), value=False)
        step_ids, step_pos = ids, position_ids(real)
    return out
