"""Rank checks as tables: saturated, underused, inconclusive (memorisation), data against capacity."""

from __future__ import annotations

import pytest

from lora_doctor.checks import Context, Phase
from lora_doctor.checks.rank import (
    DataExceedsCapacity,
    RankInconclusive,
    RankSaturated,
    RankUnderused,
    cliff,
    effective_rank,
    stable_rank,
    summarise,
    used_rank,
)
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis import reasoning
from lora_doctor.facts import AdapterFacts, LayerSpectrum, RunFacts, SpectrumSnapshot
from lora_doctor.findings import Finding, Severity
from lora_doctor.history import History

KINDS = ("q_proj", "v_proj", "up_proj", "down_proj")
# Shapes measured in benchmarks/planted_rank.py (planted rank 8):
FLAT4 = [1.0, 0.9, 0.75, 0.6]  # r = 4 < k on unlimited data: every value comparable
CLIFF32 = [1.0, 0.93, 0.86, 0.79, 0.71, 0.64, 0.57, 0.5] + [0.04] * 24  # r = 32: 8 values, cliff
MEMO32 = [1.0 - 0.028 * i for i in range(32)]  # memorising at r = 32: smooth decay, no cliff
MEMO32[-4:] = [0.09, 0.06, 0.04, 0.02]
FALLING = [2.0, 1.6, 1.2, 0.9, 0.6, 0.4, 0.25, 0.15, 0.09, 0.05]
STALLED = [2.0, 1.0, 0.52, 0.5, 0.49, 0.5, 0.49, 0.48, 0.49, 0.48]


def _snap(
    step: int, sv: list[float], rel: float = 0.05, n: int = 2, total: int = 0
) -> SpectrumSnapshot:
    layers = [
        LayerSpectrum(
            name=f"layers.{i}.{kind}",
            kind=kind,
            r=len(sv),
            singular_values=[v * (1 + 0.1 * i) for v in sv],
            b_norm=1.0,
            relative_update=rel,
        )
        for kind in KINDS
        for i in range(n)
    ]
    return SpectrumSnapshot(
        step=step,
        kinds=summarise(layers, 0.1),
        layers=layers,
        layers_read=len(layers),
        layers_total=total or len(layers),
    )


def _ctx(
    sv: list[float],
    loss: list[float] | None = FALLING,
    phase: Phase = Phase.END,
    step: int = 100,
    tokens: int | None = None,
    params: int = 10_000,
    rel: float = 0.05,
    snapshots: int = 2,
    total: int = 0,
    growth: float = 2.0,
    **config: object,
) -> Context:
    """A run whose ``snapshots`` spectrum readings of 8 layers each (of ``total`` layers the model
    has: 8 when 0), 10 steps apart, end at ``step`` with singular values ``sv``; the update's size
    grows ``growth`` times from one reading to the next, up to ``rel`` of the frozen weight."""
    facts = RunFacts(has_lora=True, max_steps=100, lora_params=params, supervised_tokens=tokens)
    facts.spectrum = [
        _snap(
            step - 10 * (snapshots - 1 - i),
            sv,
            rel * growth ** (i - snapshots + 1),
            total=total,
        )
        for i in range(snapshots)
    ]
    history = History()
    for i, value in enumerate(loss or []):
        history.add(10 * (i + 1), {"loss": value})
    return Context(facts, history, DoctorConfig(**config), phase, step)


def _slugs(check: type, ctx: Context) -> list[str]:
    return [f.slug for f in check().run(ctx)]


SATURATED_CASES = [
    ("r-below-k-stalled", {"sv": FLAT4, "loss": STALLED}, True),
    ("r-below-k-stalled-at-log", {"sv": FLAT4, "loss": STALLED, "phase": Phase.LOG}, True),
    ("r-equals-k-loss-falling", {"sv": FLAT4, "loss": FALLING}, False),
    ("cliff-r-above-k", {"sv": CLIFF32, "loss": STALLED}, False),
    ("memorising-r32-smooth-decay", {"sv": MEMO32, "loss": STALLED}, False),
    ("memorisable-data", {"sv": FLAT4, "loss": STALLED, "tokens": 500}, False),
    ("data-exceeds-capacity", {"sv": FLAT4, "loss": STALLED, "tokens": 10**6}, True),
    ("too-early", {"sv": FLAT4, "loss": STALLED, "phase": Phase.LOG, "step": 20}, False),
    ("adapter-barely-moved", {"sv": FLAT4, "loss": STALLED, "rel": 1e-6}, False),
    ("update-not-grown-from-start", {"sv": FLAT4, "loss": STALLED, "growth": 1.05}, False),
    ("loss-unknown", {"sv": FLAT4, "loss": None}, False),
    # a time budget's reading of 8 of 112 layers: too few under the default 16, enough under 8
    ("subset-below-min-layers", {"sv": FLAT4, "loss": STALLED, "total": 112}, False),
    (
        "subset-at-min-layers",
        {"sv": FLAT4, "loss": STALLED, "total": 112, "spectrum_min_layers": 8},
        True,
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "fires"), [c[1:] for c in SATURATED_CASES], ids=[c[0] for c in SATURATED_CASES]
)
def test_rank_saturated(kwargs: dict, fires: bool) -> None:
    ctx = _ctx(**kwargs)
    found = [f for f in RankSaturated().run(ctx)]
    assert bool(found) is fires
    if fires:
        f = found[0]
        # the rollback from r 4: to the usual default, not one doubling (causes.ROLLBACK_MIN_RANK)
        assert f.recommendation is not None and f.recommendation.config_changes == {"r": 16}
        assert "r=16 with lora_alpha 4x as large" in f.recommendation.summary
        assert f.recommendation.restart_from_scratch
        assert f.evidence["r"] == 4 and set(f.evidence["by_kind"]) == set(KINDS)
        assert f.evidence["layers_full"] == 8
        total = kwargs.get("total") or 8
        assert (f.evidence["readings"], f.evidence["layers_read"]) == (2, 8)
        assert f.evidence["layers_total"] == total
        assert ("this one read 8 of 112 layers" in f.message) is (total == 112)


INCONCLUSIVE_CASES = [
    ("memorisable-data", {"sv": FLAT4, "loss": STALLED, "tokens": 500}, True),
    ("no-loss-history-at-end", {"sv": FLAT4, "loss": None}, True),
    ("no-loss-history-during-training", {"sv": FLAT4, "loss": None, "phase": Phase.LOG}, False),
    ("unlimited-data-falling-loss", {"sv": FLAT4, "loss": FALLING}, False),
    ("memorising-r32-not-full", {"sv": MEMO32, "loss": STALLED, "tokens": 500}, False),
]


@pytest.mark.parametrize(
    ("kwargs", "fires"), [c[1:] for c in INCONCLUSIVE_CASES], ids=[c[0] for c in INCONCLUSIVE_CASES]
)
def test_rank_inconclusive(kwargs: dict, fires: bool) -> None:
    found = list(RankInconclusive().run(_ctx(**kwargs)))
    assert bool(found) is fires
    if fires:
        assert found[0].severity is Severity.INFO and found[0].evidence["reason"]


def _passed(ctx: Context, new: list[Finding], reported: tuple[str, ...]) -> list[str]:
    """The slugs the diagnosis pass keeps of ``new``, with findings of ``reported`` before."""
    before = [Finding("LD000", slug, Severity.WARNING, ctx.step, slug, "") for slug in reported]
    return [f.slug for f in reasoning.run(new, before, ctx.facts, ctx.config, ctx)]


@pytest.mark.parametrize(
    ("loss", "reported", "expected"),
    [
        (STALLED, ("overfit",), ["rank-inconclusive"]),
        (FALLING, ("overfit",), ["rank-inconclusive"]),
        (STALLED, (), ["rank-saturated"]),
        (STALLED, ("overfit", "rank-inconclusive"), []),
    ],
    ids=["overfit-stalled", "overfit-falling", "no-overfit", "already-inconclusive"],
)
def test_overfit_turns_a_full_spectrum_inconclusive(
    loss: list[float], reported: tuple[str, ...], expected: list[str]
) -> None:
    """Memorising fills every direction at any r: once overfit is reported, the pass gives
    rank-inconclusive for a full spectrum, never rank-saturated (whatever the loss does)."""
    ctx = _ctx(FLAT4, loss=loss)
    new = list(RankSaturated().run(ctx))
    assert _passed(ctx, new, reported) == expected


def test_saturated_stands_down_a_later_inconclusive() -> None:
    ctx = _ctx(FLAT4, tokens=500)
    new = list(RankInconclusive().run(ctx))
    assert [f.slug for f in new] == ["rank-inconclusive"]
    assert _passed(ctx, new, ("rank-saturated",)) == []


UNDERUSED_CASES = [
    ("cliff-8-of-32", {"sv": CLIFF32}, True),
    ("cliff-8-of-32-at-log-two-readings", {"sv": CLIFF32, "phase": Phase.LOG}, True),
    ("cliff-one-reading-at-log", {"sv": CLIFF32, "phase": Phase.LOG, "snapshots": 1}, False),
    ("full-spectrum", {"sv": FLAT4}, False),
    ("memorising-r32", {"sv": MEMO32}, False),
    ("barely-moved", {"sv": CLIFF32, "rel": 1e-6}, False),
    ("too-early", {"sv": CLIFF32, "phase": Phase.LOG, "step": 20}, False),
    ("subset-below-min-layers", {"sv": CLIFF32, "total": 112}, False),
    ("not-grown-from-start", {"sv": CLIFF32, "phase": Phase.LOG, "growth": 1.05}, False),
    ("not-grown-at-end", {"sv": CLIFF32, "growth": 1.05}, False),
    ("one-reading-at-end", {"sv": CLIFF32, "snapshots": 1}, True),
]


@pytest.mark.parametrize(
    ("kwargs", "fires"), [c[1:] for c in UNDERUSED_CASES], ids=[c[0] for c in UNDERUSED_CASES]
)
def test_rank_underused(kwargs: dict, fires: bool) -> None:
    found = list(RankUnderused().run(_ctx(**kwargs)))
    assert bool(found) is fires
    if fires:
        f = found[0]
        assert f.recommendation is not None and f.recommendation.config_changes == {"r": 16}
        assert f.evidence["by_kind"]["v_proj"]["used_rank"] == 8
        assert f.evidence["by_kind"]["v_proj"]["cliff_at"] == 8
        assert f.title.startswith("The LoRA update uses about 8 of its r=32 directions in 8 of 8")


def test_rank_underused_title_counts_the_underused_layers() -> None:
    """Half the layers use 4 of 8 directions, the other half 7: the title gives the 4 of the
    layers it counts, not the 7 of the fullest kind (a title that says "7 of 8 ... r could be
    halved" disagrees with itself)."""
    ctx = _ctx([1.0, 0.9, 0.8, 0.7, 0.01, 0.01, 0.01, 0.01], rank_layer_share=0.5)
    full = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.01]
    for lay in ctx.facts.spectrum[-1].layers:
        if lay.kind in ("up_proj", "down_proj"):
            lay.singular_values = full
    (f,) = RankUnderused().run(ctx)
    assert f.title.startswith("The LoRA update uses about 4 of its r=8 directions in 4 of 8 layers")
    assert f.evidence["used_rank_underused_layers"] == 4
    assert "MiB" not in f.message  # 10,000 parameters save far less than a MiB
    assert f.recommendation is not None and len(f.recommendation.steps) == 1  # the run is over


def test_rank_underused_scales_lora_alpha_with_r() -> None:
    ctx = _ctx(CLIFF32)
    ctx.facts.adapters = {"default": AdapterFacts(r=32, lora_alpha=64)}
    (f,) = RankUnderused().run(ctx)
    assert f.recommendation is not None
    assert f.recommendation.config_changes == {"r": 16, "lora_alpha": 32}
    assert f.recommendation.steps[0] == "In the next run set r=16 with lora_alpha=32 in LoraConfig"


CAPACITY_CASES = [
    ("data-far-above-capacity", {"tokens": 10**8, "params": 10**6}, True),
    ("data-below-capacity", {"tokens": 10**5, "params": 10**6}, False),
    ("data-just-above-capacity", {"tokens": 3 * 10**6, "params": 10**6}, False),
    ("tokens-unknown", {"tokens": None, "params": 10**6}, False),
    ("params-unknown", {"tokens": 10**8, "params": 0}, False),
]


@pytest.mark.parametrize(
    ("kwargs", "fires"), [c[1:] for c in CAPACITY_CASES], ids=[c[0] for c in CAPACITY_CASES]
)
def test_data_exceeds_capacity(kwargs: dict, fires: bool) -> None:
    found = list(DataExceedsCapacity().run(_ctx(FLAT4, phase=Phase.SETUP, **kwargs)))
    assert bool(found) is fires
    if fires:
        ev = found[0].evidence
        assert ev["capacity_bits"] == 2 * kwargs["params"]
        assert ev["data_bits"] == kwargs["tokens"]


@pytest.mark.parametrize(
    ("sv", "eff", "stable", "used", "cut"),
    [
        ([1.0, 1.0, 1.0, 1.0], 4.0, 4.0, 4, (1, 1.0)),
        ([1.0, 0.0, 0.0], 1.0, 1.0, 1, (1, float("inf"))),
        ([2.0, 1.0, 0.1, 0.05], None, 1.253125, 2, (2, 10.0)),
        ([], 0.0, 0.0, 0, (0, 1.0)),
    ],
    ids=["flat", "rank-1", "cliff", "empty"],
)
def test_spectrum_numbers(sv, eff, stable, used, cut) -> None:
    if eff is not None:
        assert effective_rank(sv) == pytest.approx(eff)
    assert 0 <= effective_rank(sv) <= max(len(sv), 1)
    assert stable_rank(sv) == pytest.approx(stable)
    assert used_rank(sv, 0.1) == used
    assert cliff(sv) == cut
