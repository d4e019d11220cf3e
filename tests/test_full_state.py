"""Full-tensor access to the adapter (`full_state_dict` / `load_full_state_dict`) at every layout.

A tiny GPT (4 layers, 8 heads in 4 query groups, gated SwiGLU fc1, all four targets) with vBuA
and with LoRA, its base moved between layouts by megatron's dist_checkpointing, at TP 1/2/4 x
PP 1/2 and TP 2 x PP 2 x VPP 2 (data parallelism fills the 8 ranks):
- the seeded start reads back bit for bit the same at every layout and on every rank;
- a random full state loads and reads back bit for bit at every layout;
- that state, loaded at a layout, gives the per-token losses of the TP 1 x PP 1 base with the
  dense ΔW_l = s·diag(v_l)·B·diag(u_l)·A computed from the full tensors alone and added to its
  weights (whose rows are megatron's global order by construction): a wrong row order or slice
  of any factor (QKV groups, [gate; up], row-parallel A) changes the losses;
- unknown keys, missing keys, wrong shapes and merged adapters raise on every rank, naming key
  and shapes, and change nothing; `strict=False` loads the keys given and returns the others.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import ProcessGroupPool
from tests.tiny_gpt import write_base

WORLD = 8
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RANK = 4
MODEL = dict(num_layers=4, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96)
PRESETS = ("vBuA", "lora")
#: (tp, pp, vpp, sequence parallel); DP = 8 / (tp * pp). The first is the reference layout.
LAYOUTS = [
    (1, 1, None, False),
    (2, 1, None, False),
    (4, 1, None, True),
    (1, 2, None, False),
    (2, 2, None, False),
    (4, 2, None, False),
    (2, 2, 2, False),
]


def _id(layout: tuple) -> str:
    tp, pp, vpp, sp = layout
    return f"tp{tp}pp{pp}" + (f"vpp{vpp}" if vpp else "") + ("sp" if sp else "")


@pytest.fixture(scope="module")
def pool():
    with ProcessGroupPool(WORLD) as p:
        yield p


@pytest.fixture(scope="module")
def base_dir(pool, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("base") / "ckpt")
    pool.run(write_base, path, **MODEL)
    return path


def _random_state(fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state with every entry random and non-zero (u, v around 1), of `fresh`'s keys
    and shapes, the same on every rank."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for key, t in fresh.items():
        x = torch.randn(t.shape, generator=g, dtype=t.dtype)
        factor = key.rsplit(".", 1)[-1]
        if factor in ("u", "v"):
            out[key] = 1 + 0.5 * x
        elif factor == "A":
            out[key] = x / t.shape[1] ** 0.5
        else:
            out[key] = 0.3 * x
    return out


def _dense_delta(state: dict[str, torch.Tensor], layer: int, kind: str, s: float) -> torch.Tensor:
    """ΔW of one layer's `kind` from the full tensors: s·diag(v)·B·diag(u)·A."""
    p = f"layers.{layer}.{kind}."
    a = state.get(p + "A", state.get(f"tied.{kind}.A"))
    b = state.get(p + "B", state.get(f"tied.{kind}.B")) * s
    if p + "v" in state:
        b = state[p + "v"][:, None] * b
    if p + "u" in state:
        a = state[p + "u"][:, None] * a
    return b @ a


def _token_losses(chunks) -> list[torch.Tensor] | None:
    """Per-token losses of two fixed micro-batches through megatron's forward-only schedule
    (None off the last pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.tiny_gpt import MICRO_BATCH, SEQ, batches

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        output = model(tokens, position_ids, None, labels=labels)
        return output, lambda out: (out.sum(), {"tokens": out.detach().clone()})

    data = batches(2, seed=3)
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(data) for _ in chunks] if len(chunks) > 1 else iter(data),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(data),
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=True,
        )
    return [x["tokens"] for x in out] if out else None


def _run_layout(base: str, layout: tuple) -> dict:
    """For each preset: the full state of the seeded start, then a random full state loaded,
    read back and run. At TP 1 x PP 1 also the dense reference's losses."""
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import build_chunks, init_layout, load_base
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora

    tp, pp, vpp, sp = layout
    config = init_layout(tp, pp, vpp, sp=sp, **MODEL)
    out = {}
    try:
        for preset in PRESETS:
            chunks = build_chunks(config, seed=99)
            load_base(chunks, base)
            cfg = TiedLoRAConfig.preset(preset, rank=RANK, alpha=RANK, target_modules=TARGETS)
            adapters = apply_tied_lora(chunks, cfg)
            fresh = adapters.full_state_dict()
            base_losses = _token_losses(chunks) if layout == LAYOUTS[0] else None
            state = _random_state(fresh)
            missing = adapters.load_full_state_dict(state)
            r = dict(fresh=fresh, state=state, missing=missing, back=adapters.full_state_dict())
            r["base_losses"] = base_losses
            r["losses"] = _token_losses(chunks)
            if layout == LAYOUTS[0]:
                adapters.detach()
                with torch.no_grad():
                    for layer in chunks[0].decoder.layers:
                        i = layer.layer_number - 1
                        attn, mlp = layer.self_attention, layer.mlp
                        for kind, module in zip(
                            TARGETS,
                            (attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2),
                            strict=True,
                        ):
                            module.weight.add_(_dense_delta(state, i, kind, cfg.scaling))
                r["dense_losses"] = _token_losses(chunks)
            out[preset] = r
        return out
    finally:
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def run_layout(pool, base_dir):
    """Every rank's results at a layout, computed once per module."""
    cache: dict[tuple, list[dict]] = {}

    def run(layout: tuple) -> list[dict]:
        if layout not in cache:
            cache[layout] = pool.run(_run_layout, base_dir, layout)
        return cache[layout]

    return run


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert list(got) == list(want), f"{what}: keys differ"
    for key, t in want.items():
        assert got[key].dtype == t.dtype and got[key].device.type == "cpu", (what, key)
        assert torch.equal(got[key], t), f"{what}: {key} differs"


def _layer(key: str) -> int:
    return int(key.split(".")[1])


def test_key_scheme(run_layout):
    ranks = run_layout(LAYOUTS[0])
    per_layer = [
        f"layers.{i}.{k}.{f}" for i in range(MODEL["num_layers"]) for k in TARGETS for f in "uv"
    ]
    tied = [f"tied.{k}.{f}" for k in TARGETS for f in "AB"]
    keys = list(ranks[0]["vBuA"]["fresh"])
    assert sorted(keys[: len(tied)]) == sorted(tied)  # tied first, then by layer
    assert sorted(keys[len(tied) :]) == sorted(per_layer)
    assert [_layer(k) for k in keys[len(tied) :]] == sorted(_layer(k) for k in per_layer)
    lora = [
        f"layers.{i}.{k}.{f}" for i in range(MODEL["num_layers"]) for k in TARGETS for f in "AB"
    ]
    assert sorted(ranks[0]["lora"]["fresh"]) == sorted(lora)
    h, d_qkv, d_fc1 = 64, 128, 192  # QKV: (8 + 2 * 4) heads of 8; fc1: [gate; up] of 96
    shapes = {k: tuple(t.shape) for k, t in ranks[0]["vBuA"]["fresh"].items()}
    assert shapes["tied.linear_qkv.B"] == (d_qkv, RANK)
    assert shapes["tied.linear_fc1.B"] == (d_fc1, RANK)
    assert shapes["tied.linear_fc2.A"] == (RANK, 96)
    assert shapes["layers.3.linear_qkv.v"] == (d_qkv,)
    assert shapes["layers.0.linear_proj.u"] == (RANK,)
    assert shapes["tied.linear_proj.A"] == (RANK, h)


@pytest.mark.parametrize("preset", PRESETS)
def test_seeded_start_agrees_across_layouts(run_layout, preset):
    """The seeded start at every layout and on every rank, bit for bit."""
    want = run_layout(LAYOUTS[0])[0][preset]["fresh"]
    for layout in LAYOUTS:
        for rank, r in enumerate(run_layout(layout)):
            _assert_same(r[preset]["fresh"], want, f"{_id(layout)} rank {rank}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_round_trip(run_layout, layout):
    """A random full state loads and reads back unchanged, on every rank."""
    for rank, results in enumerate(run_layout(layout)):
        for preset, r in results.items():
            assert r["missing"] == []
            _assert_same(r["back"], r["state"], f"{preset} rank {rank}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_loaded_state_matches_dense_reference(run_layout, layout):
    """The model with a loaded full state computes what the dense ΔW from those full tensors
    computes in the TP 1 x PP 1 base."""
    reference = run_layout(LAYOUTS[0])[0]
    last_stage = [r for r in run_layout(layout) if r[PRESETS[0]]["losses"] is not None]
    assert last_stage
    for preset in PRESETS:
        want = reference[preset]["dense_losses"]
        # ΔW matters: the base alone is far from the reference.
        assert (reference[preset]["base_losses"][0] - want[0]).abs().mean() > 0.1
        for r in last_stage:
            for got, w in zip(r[preset]["losses"], want, strict=True):
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


def _error_cases(layout: tuple) -> dict:
    """Bad full states at a layout: the error each raised on this rank (each checked here to
    have changed nothing), then a partial load with `strict=False`."""
    from megatron.core import parallel_state as ps

    from tests.tiny_gpt import build_chunks, init_layout
    from tiedlora_megatron import TiedLoRAConfig, apply_tied_lora
    from tiedlora_megatron.export import merge_adapters, unmerge_adapters
    from tiedlora_megatron.full_state import FullStateError

    tp, pp, vpp, sp = layout
    config = init_layout(tp, pp, vpp, sp=sp, **MODEL)
    try:
        chunks = build_chunks(config, seed=99)
        cfg = TiedLoRAConfig.preset("vBuA", rank=RANK, alpha=RANK, target_modules=TARGETS)
        adapters = apply_tied_lora(chunks, cfg)
        good = {k: v + 1 for k, v in adapters.full_state_dict().items()}

        def local() -> list[torch.Tensor]:
            return [p.detach().clone() for _, p in adapters.named_parameters()]

        before = local()
        wrong = dict(good)
        wrong["tied.linear_fc1.B"] = torch.zeros(192, RANK + 1)
        missing = {k: v for k, v in good.items() if k != "layers.3.linear_fc2.v"}
        cases = {
            "unknown": {**good, "layers.1.linear_qkv.w": torch.zeros(3)},
            "missing": missing,
            "shape": wrong,
        }
        errors = {}
        for case, state in cases.items():
            try:
                adapters.load_full_state_dict(state)
                errors[case] = None
            except FullStateError as e:
                errors[case] = str(e)
            assert all(torch.equal(a, b) for a, b in zip(local(), before, strict=True)), case
        merge_adapters(adapters)  # loading now would make unmerging subtract the wrong ΔW
        try:
            adapters.load_full_state_dict(good)
            errors["merged"] = None
        except FullStateError as e:
            errors["merged"] = str(e)
        unmerge_adapters(adapters)
        assert all(torch.equal(a, b) for a, b in zip(local(), before, strict=True)), "merged"
        not_loaded = adapters.load_full_state_dict(missing, strict=False)
        back = adapters.full_state_dict()
        return dict(errors=errors, not_loaded=not_loaded, back=back, good=good)
    finally:
        ps.destroy_model_parallel()


def test_bad_states_raise_on_every_rank_and_change_nothing(pool):
    # PP 2: layer 3 lives on the second stage only; every rank still reports it missing.
    for r in pool.run(_error_cases, (2, 2, None, False)):
        errors = r["errors"]
        assert "unknown key 'layers.1.linear_qkv.w'" in errors["unknown"]
        assert "did you mean 'layers.1.linear_qkv.v'?" in errors["unknown"]
        assert "missing key 'layers.3.linear_fc2.v' (expected shape (64,))" in errors["missing"]
        assert (
            "'tied.linear_fc1.B': wrong shape: expected (192, 4), given (192, 5)" in errors["shape"]
        )
        assert "merged into their base weights" in errors["merged"]
        assert r["not_loaded"] == ["layers.3.linear_fc2.v"]
        for key, value in r["back"].items():
            loaded = key != "layers.3.linear_fc2.v"
            assert torch.equal(value, r["good"][key]) == loaded, key
