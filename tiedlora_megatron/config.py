"""What a Tied-LoRA adapter is: `TiedLoRAConfig`, its presets and their notation.

An adapted linear layer `y = W x` of layer `l` computes

    y = W x + s · v_l ⊙ (B (u_l ⊙ (A x))),   s = alpha / rank,

with A (rank x d_in) and B (d_out x rank) shared by every layer's module of one kind when
`tied`, and u_l (rank) and v_l (d_out) per layer.

Notation (the paper's): the letters of the factors in use, in the order `v B u A`. A and B are
always in use; u and v only when their letter appears (a missing vector is the constant 1). A
matrix followed by `~` (or written with a combining strike, as in the paper: `B̶`) is frozen at its
random start; every other factor present is trained. So `vBuA` trains all four (the paper's
best, "TL6"), `vB~uA~` trains only the vectors (VeRA's structure), `BA` untied is LoRA.

Mixture-of-experts layers add an expert index e to the layer index l. For the routed experts'
targets (`experts.linear_fc1`, `experts.linear_fc2`) the vectors are always per (l, e), and the
pair A, B is, by `tied` and `tie_experts`:
- tied across layers and experts (the default when tied): ΔW_le = s·diag(v_le)·B·diag(u_le)·A;
- tied across layers, one pair per expert (`tie_experts=False`): ΔW_le = s·diag(v_le)·B_e·diag(u_le)·A_e;
- untied (`tied=False`; with "BA", per-expert LoRA): ΔW_le = s·diag(v_le)·B_le·diag(u_le)·A_le.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

#: Linear layers of attention and of a dense MLP, by their names in megatron-core module paths.
DENSE_TARGETS: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

#: Linear layers of a mixture-of-experts MLP (megatron-core's MoELayer): the routed experts'
#: (`mlp.experts.local_experts.<i>.linear_fc1`, SequentialMLP) and the shared expert's
#: (`mlp.shared_experts.linear_fc1`). A dense name never matches an expert layer, so
#: `linear_fc1` and `experts.linear_fc1` adapt the dense and the expert MLPs separately.
MOE_TARGETS: tuple[str, ...] = (
    "experts.linear_fc1",
    "experts.linear_fc2",
    "shared_experts.linear_fc1",
    "shared_experts.linear_fc2",
)

#: Every target kind that can be adapted.
SUPPORTED_TARGETS: tuple[str, ...] = DENSE_TARGETS + MOE_TARGETS

#: Initialisations of the matrices A and B.
MatrixInit = Literal["kaiming_uniform", "normal", "zeros"]
MATRIX_INITS: tuple[str, ...] = ("kaiming_uniform", "normal", "zeros")

#: The order factors are written in and the order "auto" picks the one that starts at zero.
FACTOR_ORDER: tuple[str, ...] = ("v", "B", "u", "A")

_STRIKE = "\u0336"  # combining long stroke overlay, as in the paper's "B̶"

#: Named presets: name -> (notation, tied, extra field values).
PRESETS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "lora": ("BA", False, {}),
    # VeRA (Kopiczko et al. 2023): frozen shared random A, B; trained vectors, d = u starts 0.1.
    "vera": ("vB~uA~", True, {"u_init": 0.1}),
    "vBuA": ("vBuA", True, {}),
    "vBA": ("vBA", True, {}),
    "BuA": ("BuA", True, {}),
    "BA": ("BA", True, {}),
    "vB~uA": ("vB~uA", True, {}),
    "vBuA~": ("vBuA~", True, {}),
    "vB~uA~": ("vB~uA~", True, {}),
    "vB~A": ("vB~A", True, {}),
    "B~uA": ("B~uA", True, {}),
}


class ConfigError(ValueError):
    """A Tied-LoRA configuration that cannot work, with the reason in the message."""


@dataclass(frozen=True)
class FactorSpec:
    """One factor of the adapter as the notation and the config define it."""

    name: str  # "A", "B", "u" or "v"
    trained: bool
    init: str | float  # a MATRIX_INITS name for A/B, a constant for u/v

    @property
    def starts_at_zero(self) -> bool:
        return self.init == "zeros" or (not isinstance(self.init, str) and self.init == 0.0)


def parse_notation(notation: str) -> dict[str, bool]:
    """`"vB~uA"` -> `{"v": True, "B": False, "u": True, "A": True}` (factor -> trained)."""
    text = notation.replace(_STRIKE, "~").replace(" ", "")
    used: dict[str, bool] = {}
    i = 0
    while i < len(text):
        letter = text[i]
        frozen = i + 1 < len(text) and text[i + 1] == "~"
        if letter not in FACTOR_ORDER:
            raise ConfigError(
                f"factor notation {notation!r}: unknown letter {letter!r}; use the letters of "
                f"{''.join(FACTOR_ORDER)} in that order, a '~' after A or B to freeze it"
            )
        if letter in used:
            raise ConfigError(f"factor notation {notation!r}: {letter!r} appears twice")
        if frozen and letter in ("u", "v"):
            raise ConfigError(
                f"factor notation {notation!r}: a frozen vector {letter}~ is a constant; "
                f"leave {letter!r} out to use the constant 1"
            )
        used[letter] = not frozen
        i += 2 if frozen else 1
    order = [f for f in FACTOR_ORDER if f in used]
    if list(used) != order:
        raise ConfigError(
            f"factor notation {notation!r}: write the factors in the order v, B, u, A "
            f"(as in ΔW = diag(v)·B·diag(u)·A), e.g. {format_notation(used)!r}"
        )
    for matrix in ("A", "B"):
        if matrix not in used:
            raise ConfigError(
                f"factor notation {notation!r}: {matrix} is missing; every adapter has A and B "
                f"(write {matrix}~ to freeze it)"
            )
    return {f: used[f] for f in FACTOR_ORDER if f in used}


def format_notation(factors: dict[str, bool]) -> str:
    """The canonical ASCII notation of `{factor: trained}`."""
    out = []
    for f in FACTOR_ORDER:
        if f in factors:
            out.append(f + ("" if factors[f] else "~"))
    return "".join(out)


@dataclass
class TiedLoRAConfig:
    """A Tied-LoRA adapter: which layers, which factors, how they start.

    Build one from a preset (`TiedLoRAConfig.preset("vBuA", rank=8)`) or field by field; the
    config is validated on construction and every error names the field at fault.
    """

    rank: int = 8
    """Rank r of A (r x d_in) and B (d_out x r). Never sharded across tensor-parallel ranks."""

    alpha: float | None = None
    """Scale numerator: ΔW is multiplied by s = alpha / rank. None means alpha = rank (s = 1)."""

    dropout: float = 0.0
    """Dropout probability on the adapter's input (as LoRA's), in [0, 1)."""

    target_modules: list[str] = field(default_factory=lambda: ["linear_qkv"])
    """Names of megatron-core linear layers to adapt (a subset of SUPPORTED_TARGETS). The
    paper adapts the fused QKV projection only; `linear_fc1` covers gated (SwiGLU) fc1."""

    factors: str = "vBuA"
    """Which of v, B, u, A are used and trained, in the notation above."""

    tied: bool = True
    """Share one A and one B among all layers' modules of the same kind. False gives every
    layer its own A and B (LoRA when `factors == "BA"`; per-expert LoRA on expert targets)."""

    tie_experts: bool | None = None
    """Routed-expert targets (`experts.*`) with `tied`: True shares one A and one B among every
    expert of every layer, with u and v per (layer, expert) - the Tied-LoRA idea applied to the
    expert dimension too; False keeps one pair per expert index, tied across layers. None means
    True when `tied`. Untied adapters give each (layer, expert) its own pair, so True is refused
    with `tied=False`."""

    a_init: MatrixInit | None = None
    """Start of A: "kaiming_uniform" (as LoRA's A), "normal" (std 1/rank) or "zeros".
    None: zeros if A is the factor chosen to start at zero (see `zero_factor`), else kaiming."""

    b_init: MatrixInit | None = None
    """Start of B, as `a_init`."""

    u_init: float | None = None
    """Constant start of u. None: 0 if u is the factor chosen to start at zero, else 1."""

    v_init: float | None = None
    """Constant start of v. None: 0 if v is the factor chosen to start at zero, else 1."""

    seed: int = 1234
    """Seed of the random factors. The full (unsharded) factors depend only on it, the target
    kind and the layer, never on the parallel layout."""

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        self.factors = format_notation(parse_notation(self.factors))
        self._validate()
        if self.tie_experts is None:
            self.tie_experts = self.tied

    # -- presets ---------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TiedLoRAConfig:
        """A named preset ("lora", "vera", "vBuA", ... see PRESETS) or any notation string,
        with field overrides."""
        key = name.replace(_STRIKE, "~")
        if key in PRESETS:
            notation, tied, extra = PRESETS[key]
        elif key.lower() in PRESETS:
            notation, tied, extra = PRESETS[key.lower()]
        else:
            try:
                notation, tied, extra = format_notation(parse_notation(key)), True, {}
            except ConfigError as e:
                close = difflib.get_close_matches(name, list(PRESETS), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ConfigError(
                    f"unknown preset {name!r} (presets: {', '.join(PRESETS)}; or a factor "
                    f"notation such as 'vB~uA'){hint}\n  as a notation: {e}"
                ) from None
        values: dict[str, Any] = {"factors": notation, "tied": tied, **extra}
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TiedLoRAConfig:
        """Build from a mapping (YAML, a checkpoint's metadata); unknown keys are errors."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            msgs = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"unknown TiedLoRAConfig field(s): {', '.join(msgs)}; fields: {', '.join(names)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived ---------------------------------------------------------------------------

    @property
    def scaling(self) -> float:
        """s = alpha / rank."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def used(self) -> dict[str, bool]:
        """Factor -> trained, for the factors in use."""
        return parse_notation(self.factors)

    def uses(self, factor: str) -> bool:
        return factor in self.used

    def trains(self, factor: str) -> bool:
        return self.used.get(factor, False)

    @property
    def zero_factor(self) -> str:
        """The factor that starts at zero so that ΔW = 0 at the start: the one set to zero
        explicitly, else the first trained one without an explicit start, in the order
        v, B, u, A (v = 0 with B random, else B = 0 as in LoRA, ...)."""
        inits = self._explicit_inits()
        explicit = [f for f, s in inits.items() if _is_zero(s)]
        if explicit:
            return explicit[0]
        free = [f for f in FACTOR_ORDER if self.trains(f) and inits[f] is None]
        if not free:
            raise ConfigError(
                f"no factor of {self.factors!r} starts at zero, so ΔW != 0 at the start and "
                "the adapted model would not equal the base model: leave the start of one "
                "trained factor unset (or set it to zero)"
            )
        return free[0]

    def factor_spec(self, factor: str) -> FactorSpec:
        """Trained flag and resolved start of one factor in use."""
        if not self.uses(factor):
            raise KeyError(f"factor {factor!r} is not used by {self.factors!r}")
        explicit = self._explicit_inits()[factor]
        zero = factor == self.zero_factor
        if factor in ("A", "B"):
            init: str | float = explicit or ("zeros" if zero else "kaiming_uniform")
        else:
            init = float(explicit) if explicit is not None else (0.0 if zero else 1.0)
        return FactorSpec(factor, self.trains(factor), init)

    def _explicit_inits(self) -> dict[str, Any]:
        return {"v": self.v_init, "B": self.b_init, "u": self.u_init, "A": self.a_init}

    # -- validation ------------------------------------------------------------------------

    def _validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError(
                "target_modules is empty: name at least one of " + ", ".join(SUPPORTED_TARGETS)
            )
        for t in self.target_modules:
            if t not in SUPPORTED_TARGETS:
                close = difflib.get_close_matches(str(t), SUPPORTED_TARGETS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"unknown target module {t!r}{hint}; supported: {', '.join(SUPPORTED_TARGETS)}"
                )
        if self.tie_experts and not self.tied:
            raise ConfigError(
                "tie_experts=True needs tied=True: an untied adapter gives every (layer, expert) "
                "its own A and B; leave tie_experts unset"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"target_modules lists a module twice: {self.target_modules}")
        for name, value in (("a_init", self.a_init), ("b_init", self.b_init)):
            if value is not None and value not in MATRIX_INITS:
                raise ConfigError(f"{name} must be one of {MATRIX_INITS} or None, got {value!r}")
        for factor, value in self._explicit_inits().items():
            if value is not None and not self.uses(factor):
                raise ConfigError(
                    f"{factor}_init is set but {factor} is not used by factors={self.factors!r}"
                )
        if not any(self.used.values()):
            raise ConfigError(f"factors={self.factors!r} trains nothing: drop a '~' or add u or v")
        explicit_zero = [f for f, s in self._explicit_inits().items() if _is_zero(s)]
        if len(explicit_zero) > 1:
            raise ConfigError(
                f"{' and '.join(explicit_zero)} both start at zero: the gradient of each is a "
                "product containing the other, so neither would ever move; set only one to zero"
            )
        if explicit_zero and not self.trains(explicit_zero[0]):
            raise ConfigError(
                f"{explicit_zero[0]} starts at zero but is frozen: the adapter would stay ΔW = 0"
            )
        self.zero_factor  # noqa: B018 - raises when no factor starts at zero


def _is_zero(init: Any) -> bool:
    if init is None:
        return False
    if isinstance(init, str):
        return init == "zeros"
    return float(init) == 0.0
