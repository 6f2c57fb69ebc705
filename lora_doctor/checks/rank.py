"""Rank checks: the spectrum of the learned update, and the training data against the adapter's capacity.

The spectrum probe (``lora_doctor/probes/spectrum.py``) records, every so often, the singular values
of each layer's ``scaling * B @ A``. The helpers here turn them into plain verdicts:

- a layer *fills* its rank when its smallest singular value is a sizeable fraction of its largest
  (``rank_full_ratio``): no value near zero, no cliff;
- a layer *underuses* its rank when few of its values stand above a noise floor
  (``rank_noise_floor`` of the largest): there is a cliff, and the values past it are noise.

A full spectrum alone is not proof that r binds. On a small dataset that the adapter can memorise,
the update fills every direction it has at any r (measured: entropy rank 27 to 30 of 32 with a
planted rank of 8, benchmarks/planted_rank.py). So ``rank-saturated`` also requires that the loss
has stopped improving and that the data cannot be memorised by the adapter; where the evidence
cannot tell, ``rank-inconclusive`` says so instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lora_doctor.checks.base import Check, Context, Phase, Read, Reads
from lora_doctor.diagnosis.causes import rank_and_alpha, rollback
from lora_doctor.facts import LayerSpectrum, SpectrumSnapshot
from lora_doctor.findings import Finding, Recommendation, Severity

__all__ = [
    "CHECKS",
    "DataExceedsCapacity",
    "RankInconclusive",
    "RankSaturated",
    "RankUnderused",
    "cliff",
    "effective_rank",
    "inconclusive_by_memorising",
    "stable_rank",
    "summarise",
    "used_rank",
]

#: Bytes per trainable fp32 parameter: weight, gradient and two Adam moments.
_BYTES_PER_TRAINABLE = 16


# --- spectrum math (plain numbers) ------------------------------------------------------------------
def _values(sv: Sequence[float]) -> np.ndarray:
    arr = np.abs(np.asarray(sv, dtype=float))
    arr = arr[np.isfinite(arr)]
    return np.sort(arr)[::-1]


def effective_rank(sv: Sequence[float]) -> float:
    """Entropy effective rank: ``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli 2007).

    Example:
        >>> round(effective_rank([1.0, 1.0, 1.0, 0.0]), 6)
        3.0
    """
    s = _values(sv)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def stable_rank(sv: Sequence[float]) -> float:
    """Stable rank ``||M||_F^2 / ||M||_2^2 = sum(s^2) / max(s)^2``.

    Example:
        >>> stable_rank([2.0, 2.0, 0.0])
        2.0
    """
    s = _values(sv)
    if s.size == 0 or s[0] <= 0:
        return 0.0
    return float(np.sum(s**2) / s[0] ** 2)


def used_rank(sv: Sequence[float], noise_floor: float) -> int:
    """How many singular values stand at or above ``noise_floor`` times the largest.

    Example:
        >>> used_rank([1.0, 0.8, 0.05, 0.01], 0.1)
        2
    """
    s = _values(sv)
    if s.size == 0 or s[0] <= 0:
        return 0
    return int(np.sum(s >= noise_floor * s[0]))


def cliff(sv: Sequence[float]) -> tuple[int, float]:
    """The largest drop between consecutive singular values: ``(k, s_k / s_(k+1))``.

    ``k`` counts the values before the drop (1-based); the ratio is ``inf`` when the value after it
    is zero, and ``(len, 1.0)`` when there is only one value.

    Example:
        >>> cliff([1.0, 0.9, 0.05, 0.04])
        (2, 18.0)
    """
    s = _values(sv)
    if s.size < 2:
        return int(s.size), 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(s[1:] > 0, s[:-1] / np.where(s[1:] > 0, s[1:], 1.0), np.inf)
    ratios = np.where(s[:-1] > 0, ratios, 1.0)
    k = int(np.argmax(ratios))
    return k + 1, float(ratios[k])


def _min_max(sv: Sequence[float]) -> float:
    s = _values(sv)
    return float(s[-1] / s[0]) if s.size and s[0] > 0 else 0.0


def summarise(layers: Iterable[LayerSpectrum], noise_floor: float) -> dict[str, dict[str, Any]]:
    """Per module kind: medians over its layers of the spectrum's key numbers.

    Keys: ``layers``, ``r``, ``effective_rank``, ``stable_rank``, ``used_rank``, ``min_over_max``,
    ``cliff_at``, ``cliff_ratio``, ``relative_update``, ``b_norm`` and ``spectrum`` (the median
    normalised singular values, largest first).

    Example:
        >>> lay = LayerSpectrum("l0.q_proj", "q_proj", r=2, singular_values=[2.0, 1.0])
        >>> summarise([lay], 0.1)["q_proj"]["min_over_max"]
        0.5
    """
    by_kind: dict[str, list[LayerSpectrum]] = {}
    for layer in layers:
        by_kind.setdefault(layer.kind or "other", []).append(layer)
    out: dict[str, dict[str, Any]] = {}
    for kind, group in sorted(by_kind.items()):
        spectra = [_values(lay.singular_values) for lay in group]
        width = max((s.size for s in spectra), default=0)
        norm = np.full((len(spectra), width), np.nan)
        for i, s in enumerate(spectra):
            if s.size and s[0] > 0:
                norm[i, : s.size] = s / s[0]
        cliffs = [cliff(lay.singular_values) for lay in group]
        rel = [lay.relative_update for lay in group if lay.relative_update is not None]
        out[kind] = {
            "layers": len(group),
            "r": int(np.median([lay.r for lay in group])),
            "effective_rank": _median(effective_rank(lay.singular_values) for lay in group),
            "stable_rank": _median(stable_rank(lay.singular_values) for lay in group),
            "used_rank": _median(used_rank(lay.singular_values, noise_floor) for lay in group),
            "min_over_max": _median(_min_max(lay.singular_values) for lay in group),
            "cliff_at": _median(c[0] for c in cliffs),
            "cliff_ratio": _median(c[1] for c in cliffs),
            "relative_update": _median(rel) if rel else None,
            "b_norm": _median(lay.b_norm for lay in group),
            "spectrum": [round(float(v), 4) for v in np.nanmedian(norm, axis=0)]
            if width and not np.all(np.isnan(norm))
            else [],
        }
    return out


def _median(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return float(np.median(arr)) if arr.size else float("nan")


# --- the assessment the checks share ------------------------------------------------------------
@dataclass
class _Assessment:
    """What the latest spectrum and the run's data say about the rank."""

    snapshot: SpectrumSnapshot
    layers: list[LayerSpectrum]
    full: list[LayerSpectrum]
    underused: list[LayerSpectrum]
    moved: bool
    median_update: float | None
    skipped_init: int
    evidence: dict[str, Any] = field(default_factory=dict)


def _progress_ok(ctx: Context, step: int) -> bool:
    """Far enough into training for the spectrum to have formed (always at the end)."""
    if ctx.phase is Phase.END:
        return True
    max_steps = ctx.facts.max_steps
    return bool(max_steps) and step >= ctx.config.rank_min_progress * max_steps


def _update_size(snap: SpectrumSnapshot) -> float | None:
    """The learned update's size at a reading: the median over module kinds of its norm
    relative to the frozen weight, else of the norm of B; None when neither was read."""
    for key in ("relative_update", "b_norm"):
        values = [
            float(s[key])
            for s in snap.kinds.values()
            if isinstance(s.get(key), int | float) and math.isfinite(s[key])
        ]
        if values:
            return float(np.median(values))
    return None


def _growth(ctx: Context, snap: SpectrumSnapshot) -> float | None:
    """How many times the update has grown since the first reading where it was not zero; None
    when ``snap`` is that reading (or none has a size)."""
    for earlier in ctx.facts.spectrum:
        if earlier is snap:
            return None
        size = _update_size(earlier)
        if size:
            now = _update_size(snap)
            return now / size if now is not None else None
    return None


def _grown(ctx: Context, snap: SpectrumSnapshot) -> bool:
    """The update has grown from its start by ``rank_min_growth``: the first steps' spectrum no
    longer dominates it. With no earlier reading to compare with, only a reading at the end of
    training is judged."""
    growth = _growth(ctx, snap)
    if growth is None:
        return ctx.phase is Phase.END
    return growth >= ctx.config.rank_min_growth


def _assess(ctx: Context) -> _Assessment | None:
    """The latest snapshot's verdict per layer, or None before there is one worth reading: one
    past ``rank_min_progress`` that read at least ``spectrum_min_layers`` layers (every layer when
    the model has fewer; a reading under a tight time budget may read a subset)."""
    if not ctx.facts.spectrum:
        return None
    snap = ctx.facts.spectrum[-1]
    if not snap.layers or not _progress_ok(ctx, snap.step):
        return None
    cfg = ctx.config
    total = max(snap.layers_total, len(snap.layers))
    if len(snap.layers) < min(total, cfg.spectrum_min_layers):
        return None
    layers = [lay for lay in snap.layers if not lay.init_nonzero and lay.r >= 2]
    skipped = sum(lay.init_nonzero for lay in snap.layers)
    if not layers:
        return None
    full = [lay for lay in layers if _min_max(lay.singular_values) >= cfg.rank_full_ratio]
    underused = [
        lay
        for lay in layers
        if used_rank(lay.singular_values, cfg.rank_noise_floor)
        <= cfg.rank_underused_fraction * lay.r
    ]
    rel = [lay.relative_update for lay in layers if lay.relative_update is not None]
    median_update = float(np.median(rel)) if rel else None
    moved = (
        any(_values(lay.singular_values)[:1].sum() > 0 for lay in layers)
        and (median_update is None or median_update >= cfg.rank_min_update)
        and _grown(ctx, snap)
    )
    r_values = sorted({lay.r for lay in layers})
    evidence: dict[str, Any] = {
        "step": snap.step,
        "readings": len(ctx.facts.spectrum),
        "layers_read": len(snap.layers),
        "layers_total": total,
        "r": r_values[0] if len(r_values) == 1 else r_values,
        "layers": len(layers),
        "layers_full": len(full),
        "layers_underused": len(underused),
        "median_relative_update": median_update,
        "update_growth": _growth(ctx, snap),
        "full_ratio_threshold": cfg.rank_full_ratio,
        "noise_floor": cfg.rank_noise_floor,
        "by_kind": {
            kind: {
                k: s[k]
                for k in (
                    "layers",
                    "r",
                    "effective_rank",
                    "used_rank",
                    "min_over_max",
                    "cliff_at",
                    "cliff_ratio",
                )
            }
            for kind, s in snap.kinds.items()
        },
    }
    if skipped:
        evidence["skipped_nonzero_init_layers"] = skipped
    return _Assessment(snap, layers, full, underused, moved, median_update, skipped, evidence)


def _loss_trend(ctx: Context) -> tuple[bool | None, float | None]:
    """(stalled, relative improvement) of the median training loss between the last two windows.

    Each window spans ``rank_stall_window`` of the steps so far and needs two logged points; None
    when the history cannot tell.
    """
    loss = ctx.history.series("loss").finite()
    if len(loss) < 4:
        return None, None
    end = float(loss.steps[-1])
    width = ctx.config.rank_stall_window * end
    last = loss.values[(loss.steps > end - width)]
    prev = loss.values[(loss.steps > end - 2 * width) & (loss.steps <= end - width)]
    if last.size < 2 or prev.size < 2:
        return None, None
    before, now = float(np.median(prev)), float(np.median(last))
    if before == 0:
        return None, None
    improvement = (before - now) / abs(before)
    return improvement < ctx.config.rank_stall_improvement, improvement


def _capacity(ctx: Context) -> dict[str, Any] | None:
    """Supervised tokens against the adapter's capacity, or None when either is unknown."""
    tokens, params = ctx.facts.supervised_tokens, ctx.facts.lora_params
    if tokens is None or not params:
        return None
    cfg = ctx.config
    data_bits = tokens * cfg.data_bits_per_token
    capacity_bits = params * cfg.capacity_bits_per_param
    return {
        "supervised_tokens": tokens,
        "supervised_tokens_sampled": ctx.facts.supervised_tokens_sampled,
        "lora_params": params,
        "data_bits": data_bits,
        "capacity_bits": capacity_bits,
        "data_over_capacity": data_bits / capacity_bits,
        "bits_per_token": cfg.data_bits_per_token,
        "bits_per_param": cfg.capacity_bits_per_param,
    }


def _memorisable(ctx: Context) -> tuple[bool, str]:
    """Whether a full spectrum could come from memorising the data (the adapter's capacity
    exceeds the data's information), and why. The diagnosis pass adds the other sign of
    memorising, an overfit finding."""
    cap = _capacity(ctx)
    if cap is not None and cap["data_bits"] <= cap["capacity_bits"]:
        return True, (
            f"the adapter can hold the whole training set: about {cap['capacity_bits']:.3g} bits of "
            f"capacity ({cap['lora_params']:,} LoRA parameters at "
            f"{cap['bits_per_param']:g} bits each) against about {cap['data_bits']:.3g} bits in "
            f"{cap['supervised_tokens']:,} supervised tokens"
        )
    return False, ""


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _widespread(ctx: Context, verdict: str) -> _Assessment | None:
    """The assessment when the update has moved and the layers in ``verdict`` ("full" or
    "underused") make up at least ``rank_layer_share`` of all layers; None otherwise."""
    a = _assess(ctx)
    if a is None or not a.moved:
        return None
    if _share(len(getattr(a, verdict)), len(a.layers)) < ctx.config.rank_layer_share:
        return None
    return a


def _with_capacity(ctx: Context, evidence: dict[str, Any]) -> dict[str, Any]:
    """``evidence`` with the data-versus-capacity figures added when they are known."""
    cap = _capacity(ctx)
    if cap is not None:
        evidence["capacity"] = cap
    return evidence


def _at(a: _Assessment) -> str:
    """ "At step N", with how many layers the reading read when it read a subset (the time budget's
    choice), and how many readings there were."""
    ev = a.evidence
    part = (
        f"; this one read {ev['layers_read']} of {ev['layers_total']} layers"
        if ev["layers_read"] < ev["layers_total"]
        else ""
    )
    return f"At step {a.snapshot.step} (spectrum readings so far: {ev['readings']}{part})"


def _fmt_kinds(a: _Assessment, key: str) -> str:
    return ", ".join(
        f"{kind} {s[key]:.3g}/{s['r']}"
        for kind, s in a.snapshot.kinds.items()
        if isinstance(s.get(key), (int, float)) and math.isfinite(s[key])
    )


# --- checks -------------------------------------------------------------------------------------
#: What the spectrum checks read: they look when a new spectrum reading or a new loss arrives
#: (the loss trend is part of the verdict).
_RANK_READS = (Reads("spectrum", Read.LATEST, fact=True), Reads("loss", Read.LATEST))


class RankSaturated(Check):
    """The learned update fills its whole rank in most layers and the loss has stopped improving.

    A layer fills its rank when its smallest singular value is at least ``rank_full_ratio`` of the
    largest (no value near zero, no cliff). With a plateau, that is the evidence that r binds
    (planted-rank benchmark: r < k stalls at a loss floor with every singular value comparable,
    r >= k shows k large values and a cliff). It is withheld when the adapter could memorise the
    data (its capacity, at about 2 bits per parameter, Allen-Zhu & Li 2024, "Physics of Language
    Models: Part 3.3", exceeds the data's information; or the run overfits): a memorising update
    fills every rank, and ``rank-inconclusive`` reports that case. The fix follows the rollback
    practice: adapter shapes are fixed at initialisation, so a new r needs a fresh start.
    """

    code, slug, severity = "LD401", "rank-saturated", Severity.WARNING
    phases = frozenset({Phase.LOG, Phase.END})
    reads = _RANK_READS
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        a = _widespread(ctx, "full")
        if a is None or _memorisable(ctx)[0]:
            return
        stalled, improvement = _loss_trend(ctx)
        if not stalled:
            return
        r = a.evidence["r"]
        evidence = _with_capacity(ctx, {**a.evidence, "loss_improvement": improvement})
        yield self.finding(
            ctx,
            f"The LoRA update fills its whole rank (r={r}) in {len(a.full)} of {len(a.layers)} "
            "layers and the loss has stalled: r binds",
            f"{_at(a)}, the smallest singular value of scaling * B @ A is at least "
            f"{ctx.config.rank_full_ratio:g} of the largest in {len(a.full)} of {len(a.layers)} "
            f"layers (used/r per kind: {_fmt_kinds(a, 'used_rank')}; smallest/largest: "
            + ", ".join(f"{k} {s['min_over_max']:.2f}" for k, s in a.snapshot.kinds.items())
            + f"), with no cliff, and the median training loss improved by only "
            f"{(improvement or 0.0):.1%} over the last {ctx.config.rank_stall_window:.0%} of the "
            "steps. Every direction the adapter has is in use while the loss no longer falls: the "
            "rank is the likely limit. A too-low learning rate or adapters on attention only also "
            "stall a loss; rule them out first (loss-plateau lists them).",
            evidence=evidence,
            recommendation=_rollback(ctx, r),
        )


def _rollback(ctx: Context, spectrum_r: Any) -> Recommendation:
    """The same rank rollback as the plateau's (:func:`~lora_doctor.diagnosis.causes.rollback`):
    r and lora_alpha from the run's facts, the rank of the spectrum when the facts have none."""
    r, alpha, _ = rank_and_alpha(ctx.facts)
    if r is None and isinstance(spectrum_r, int):
        r = spectrum_r
    return rollback(r, alpha, ctx.facts, ctx.config)


class RankInconclusive(Check):
    """The update fills its rank, but the evidence cannot tell whether r binds.

    Reported instead of ``rank-saturated`` when the adapter could memorise its training data (its
    capacity exceeds the data's estimated information; the diagnosis pass adds the other sign, an
    overfit finding, through :func:`inconclusive_by_memorising`): memorising fills every direction
    at any r, so a full spectrum says nothing about the rank. Also reported at the end of training
    when the spectrum is full but the loss history cannot show a stall.
    """

    code, slug, severity = "LD404", "rank-inconclusive", Severity.INFO
    phases = frozenset({Phase.LOG, Phase.END})
    reads = _RANK_READS
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        a = _widespread(ctx, "full")
        if a is None:
            return
        memorisable, why = _memorisable(ctx)
        stalled, improvement = _loss_trend(ctx)
        if memorisable:
            reason = _memorising(why)
        elif stalled is None and ctx.phase is Phase.END:
            reason = "the logged training loss is too short to show whether it stalled"
        else:
            return
        yield self.build(ctx, a, reason, improvement)

    def build(
        self, ctx: Context, a: _Assessment, reason: str, improvement: float | None
    ) -> Finding:
        """The finding for assessment ``a``, with the ``reason`` r's role cannot be told."""
        evidence = _with_capacity(
            ctx, {**a.evidence, "loss_improvement": improvement, "reason": reason}
        )
        return self.finding(
            ctx,
            f"The LoRA update fills its rank in {len(a.full)} of {len(a.layers)} layers, but "
            "whether r binds cannot be told",
            f"{_at(a)}, the smallest singular value is at least "
            f"{ctx.config.rank_full_ratio:g} of the largest in {len(a.full)} of {len(a.layers)} "
            f"layers (used/r per kind: {_fmt_kinds(a, 'used_rank')}), but {reason}. Do not raise r "
            "on this evidence alone: if the loss plateaus, check the learning rate and the targets "
            "first; if validation loss rises, lower r or add lora_dropout instead.",
            evidence=evidence,
        )


def _memorising(why: str) -> str:
    return (
        f"{why}, so a full spectrum may come from memorising examples rather than from a rank "
        "that binds (a memorising update fills every direction at any r)"
    )


def inconclusive_by_memorising(ctx: Context, why: str) -> Finding | None:
    """``rank-inconclusive`` when the latest spectrum is full and a sign of memorising (``why``,
    e.g. an overfit finding) is known; None when the spectrum is not full or not ready.

    The diagnosis pass calls it: memorising explains a full spectrum, so it is no evidence that
    r binds (``rank-saturated`` is stood down then).
    """
    a = _widespread(ctx, "full")
    if a is None:
        return None
    return RankInconclusive().build(ctx, a, _memorising(why), _loss_trend(ctx)[1])


class RankUnderused(Check):
    """The learned update uses far less than its rank in most layers: r could be halved.

    A layer underuses its rank when at most ``rank_underused_fraction`` of its singular values
    stand above the noise floor (``rank_noise_floor`` of the largest): the spectrum has a cliff and
    the values past it are noise (planted-rank benchmark: at r = 2k and 4k the update shows k large
    values, then a drop to about 0.05 of the largest). Required on two readings in a row so that a
    spectrum still forming is not mistaken for an idle one. Halving r halves the adapter's
    parameters, gradients and optimizer state.
    """

    code, slug, severity = "LD402", "rank-underused", Severity.INFO
    phases = frozenset({Phase.LOG, Phase.END})
    reads = _RANK_READS
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        a = _widespread(ctx, "underused")
        if a is None:
            return
        if ctx.phase is not Phase.END and not self._stable(ctx, a):
            return
        r = a.evidence["r"]
        floor = ctx.config.rank_noise_floor
        # the title speaks of the layers it counts: the underused ones
        used = round(_median(used_rank(lay.singular_values, floor) for lay in a.underused))
        half = max(1, r // 2) if isinstance(r, int) else None
        saved = ctx.facts.lora_params // 2 * _BYTES_PER_TRAINABLE if ctx.facts.lora_params else None
        evidence = {
            **a.evidence,
            "used_rank_underused_layers": used,
            "suggested_r": half,
            "bytes_saved_estimate": saved,
        }
        target = f"r={half}" if half else "half of r"
        _, alpha, scale = rank_and_alpha(ctx.facts)
        changes: dict[str, Any] = {"r": half} if half else {}
        alpha_text = " and scale lora_alpha alike"
        if half and isinstance(r, int) and alpha is not None:
            # the same scaling, unless it is off the usual one (alpha-rank-ratio says so): then 2
            cfg = ctx.config
            usual = scale is not None and (
                cfg.scaling_low * (1 - cfg.scaling_tolerance)
                <= scale
                <= cfg.scaling_high * (1 + cfg.scaling_tolerance)
            )
            rslora = any(a.use_rslora for a in ctx.facts.adapters.values()) or any(
                lf.use_rslora for lf in ctx.facts.layers
            )
            if usual:  # alpha/r, or alpha/sqrt(r) with rsLoRA, unchanged
                new_alpha = alpha * (math.sqrt(half / r) if rslora else half / r)
            else:
                new_alpha = 2.0 * (math.sqrt(half) if rslora else half)
            changes["lora_alpha"] = (
                int(new_alpha) if new_alpha.is_integer() else round(new_alpha, 4)
            )
            alpha_text = f" with lora_alpha={new_alpha:g}"
        size = f" (about {saved / 2**20:.0f} MiB)" if saved and saved >= 2**20 else ""
        yield self.finding(
            ctx,
            f"The LoRA update uses about {used} of its r={r} directions in {len(a.underused)} of "
            f"{len(a.layers)} layers: r could be halved",
            f"{_at(a)}, at most {ctx.config.rank_underused_fraction:g} of r "
            f"singular values of scaling * B @ A stand above {ctx.config.rank_noise_floor:g} of "
            f"the largest in {len(a.underused)} of {len(a.layers)} layers (used/r per kind: "
            f"{_fmt_kinds(a, 'used_rank')}; largest drop after value "
            + ", ".join(f"{k} {s['cliff_at']:.0f}" for k, s in a.snapshot.kinds.items())
            + "). The rest of the rank holds noise, so a loss plateau in this run is not caused "
            f"by the rank, and {target} would train as well with half the adapter's parameters, "
            f"gradients and optimizer state{size}.",
            evidence=evidence,
            recommendation=Recommendation(
                summary=f"Use {target} next time",
                steps=(
                    f"In the next run set {target}{alpha_text} in LoraConfig",
                    *(
                        ("This run can finish as it is: an idle rank does no harm to quality",)
                        if ctx.steps_left != 0
                        else ()
                    ),
                ),
                config_changes=changes,
            ),
        )

    @staticmethod
    def _stable(ctx: Context, a: _Assessment) -> bool:
        """The used rank did not grow since the previous reading (also past min progress)."""
        if len(ctx.facts.spectrum) < 2:
            return False
        prev = ctx.facts.spectrum[-2]
        if not _progress_ok(ctx, prev.step):
            return False
        for kind, now in a.snapshot.kinds.items():
            before = prev.kinds.get(kind)
            if before is None or now["used_rank"] > before["used_rank"] + 1:
                return False
        return True


class DataExceedsCapacity(Check):
    """The training data carries clearly more information than the adapter can hold.

    "LoRA Without Regret" (Schulman and Thinking Machines Lab, 2025,
    https://thinkingmachines.ai/blog/lora/) finds that LoRA tracks full fine-tuning until the
    dataset's information exceeds the adapter's capacity, then falls behind. Capacity is estimated at
    about 2 bits per trained parameter (Allen-Zhu & Li 2024, "Physics of Language Models: Part 3.3,
    Knowledge Capacity Scaling Laws", arXiv:2404.05405); the data's information at
    ``data_bits_per_token`` per supervised token, an order-of-magnitude assumption. Both figures are
    rough, so this is information with numbers, not a warning.
    """

    code, slug, severity = "LD403", "data-exceeds-capacity", Severity.INFO
    phases = frozenset({Phase.SETUP, Phase.END})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        cap = _capacity(ctx)
        if cap is None or cap["data_over_capacity"] < ctx.config.capacity_margin:
            return
        ratio = cap["data_over_capacity"]
        approx = " (estimated from a sample)" if cap["supervised_tokens_sampled"] else ""
        yield self.finding(
            ctx,
            f"The training data holds about {ratio:.3g}x more information than the LoRA adapter "
            "can store",
            f"{cap['supervised_tokens']:,} supervised tokens{approx} at about "
            f"{cap['bits_per_token']:g} bit each make about {cap['data_bits']:.3g} bits, against "
            f"about {cap['capacity_bits']:.3g} bits of capacity in {cap['lora_params']:,} LoRA "
            f"parameters at {cap['bits_per_param']:g} bits each. In this regime LoRA falls behind "
            "full fine-tuning as training goes on (LoRA Without Regret, 2025). If the loss "
            "plateaus, a larger r (or LoRA on all linear layers) is the likely fix; "
            "rank-saturated, when reported, confirms it.",
            evidence=cap,
        )


CHECKS: tuple[type[Check], ...] = (
    DataExceedsCapacity,
    RankSaturated,
    RankInconclusive,
    RankUnderused,
)
