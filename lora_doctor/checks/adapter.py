"""Adapter checks: configuration, shapes, parameter budget, targets and trainability."""

from __future__ import annotations

import math
from collections.abc import Iterable

from lora_doctor.checks.base import Check, Context, Phase
from lora_doctor.facts import LayerFacts
from lora_doctor.findings import Finding, Recommendation, Severity

__all__ = ["CHECKS", "AlphaRankRatio", "NoLoraAdapter"]


class NoLoraAdapter(Check):
    """The model has no LoRA layers: the adapter checks are switched off, training is untouched."""

    code, slug, severity = "LD100", "no-lora-adapter", Severity.INFO
    phases = frozenset({Phase.SETUP})

    def run(self, ctx: Context) -> Iterable[Finding]:
        if ctx.facts.has_lora is False:
            yield self.finding(
                ctx,
                "The model has no LoRA layers",
                "No peft LoraLayer was found in the model, so the adapter checks are switched off; "
                "the curve and memory checks still run. If you meant to train LoRA, wrap the model "
                "with peft.get_peft_model(model, LoraConfig(...)) before building the Trainer.",
            )


def _scaling(r: float, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    """The lora_alpha that gives effective scaling ``scale`` at rank ``r``."""
    return scale * (math.sqrt(r) if rslora else r)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _num(x: float) -> int | float:
    """An integral float as an int (for config_changes a user pastes into LoraConfig)."""
    return int(x) if float(x).is_integer() else round(x, 4)


class AlphaRankRatio(Check):
    """The effective scaling of the LoRA update is off the usual alpha = r or 2r.

    peft multiplies B @ A by ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA; Kalajdzievski
    2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"). Practice (Hu et al. 2021
    fixed alpha to the first r tried; Unsloth and Raschka's LoRA experiments recommend alpha = r or
    2r) keeps the scaling at 1 to 2 so that the effective step does not change with r. QLoRA's
    published setup (r 64, alpha 16) trains well, so a ratio off the rule is a warning with numbers,
    not an error. Reads each layer's own r, lora_alpha and scaling, so rank_pattern and
    alpha_pattern are covered; layers whose scaling differs from the majority are named.
    """

    code, slug, severity = "LD110", "alpha-rank-ratio", Severity.WARNING
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        cfg = ctx.config
        low = cfg.scaling_low * (1 - cfg.scaling_tolerance)
        high = cfg.scaling_high * (1 + cfg.scaling_tolerance)
        groups = self._groups(ctx)
        for adapter, layers in groups.items():
            odd = [
                lf
                for lf in layers
                if lf.r > 0
                and not (low <= _scaling(lf.r, lf.lora_alpha, lf.use_rslora) <= high)
                and not _custom_init(ctx, adapter)
            ]
            if not odd:
                continue
            yield self._finding(ctx, adapter, odd, len(layers))

    def _groups(self, ctx: Context) -> dict[str, list[LayerFacts]]:
        """Layers by adapter; from the adapter configs when no live layers are known (offline)."""
        groups: dict[str, list[LayerFacts]] = {}
        for lf in ctx.facts.layers:
            groups.setdefault(lf.adapter, []).append(lf)
        for name, a in ctx.facts.adapters.items():
            if name in groups or a.r is None or a.lora_alpha is None:
                continue
            entries = [
                LayerFacts(
                    name="(all targeted layers)",
                    adapter=name,
                    r=a.r,
                    lora_alpha=a.lora_alpha,
                    use_rslora=a.use_rslora,
                )
            ]
            for pattern, r in a.rank_pattern.items():
                alpha = a.alpha_pattern.get(pattern, a.lora_alpha)
                entries.append(
                    LayerFacts(
                        name=pattern, adapter=name, r=r, lora_alpha=alpha, use_rslora=a.use_rslora
                    )
                )
            for pattern, alpha in a.alpha_pattern.items():
                if pattern not in a.rank_pattern:
                    entries.append(
                        LayerFacts(
                            name=pattern,
                            adapter=name,
                            r=a.r,
                            lora_alpha=alpha,
                            use_rslora=a.use_rslora,
                        )
                    )
            groups[name] = entries
        return groups

    def _finding(self, ctx: Context, adapter: str, odd: list[LayerFacts], total: int) -> Finding:
        first = odd[0]
        rs = first.use_rslora
        scale = _scaling(first.r, first.lora_alpha, rs)
        formula = "lora_alpha/sqrt(r)" if rs else "lora_alpha/r"
        a1, a2 = _alpha_for(1.0, first.r, rs), _alpha_for(2.0, first.r, rs)
        uniform = len({(lf.r, lf.lora_alpha) for lf in odd}) == 1
        where = (
            f"adapter '{adapter}'"
            if len(odd) == total
            else f"{len(odd)} of {total} layers of adapter '{adapter}' ("
            + ", ".join(lf.name for lf in odd[:5])
            + (", ..." if len(odd) > 5 else "")
            + ")"
        )
        direction = (
            "smaller than alpha = r: the update is scaled down and the adapter learns slowly "
            "(raising r without raising lora_alpha mutes training further)"
            if scale < ctx.config.scaling_low
            else "larger than alpha = 2r: the update is scaled up and training can be unstable"
        )
        message = (
            f"{formula} = {_fmt(scale)} (r={first.r}, lora_alpha={_fmt(first.lora_alpha)}) in {where}, "
            f"{direction}. The usual choice is lora_alpha = r or 2r, which keeps the effective "
            f"learning rate the same whatever r is. Set lora_alpha={_fmt(a1)} (scaling 1) or "
            f"{_fmt(a2)} (scaling 2), or silence with DoctorConfig(ignore={{'alpha-rank-ratio'}}) "
            f"if the scaling is deliberate (QLoRA used r 64 with alpha 16)."
        )
        if not uniform:
            message += " Scalings differ between layers: " + ", ".join(
                f"{lf.name}: r={lf.r}, alpha={_fmt(lf.lora_alpha)}" for lf in odd[:8]
            )
        return self.finding(
            ctx,
            f"lora_alpha/r scaling is {_fmt(scale)} in {where}",
            message,
            evidence={
                "adapter": adapter,
                "scaling": scale,
                "r": first.r,
                "lora_alpha": first.lora_alpha,
                "use_rslora": rs,
                "odd_layers": [lf.name for lf in odd],
                "layers": total,
                "expected_scaling": [ctx.config.scaling_low, ctx.config.scaling_high],
            },
            recommendation=Recommendation(
                summary=f"Set lora_alpha={_fmt(a2)} (2r) or {_fmt(a1)} (r) for r={first.r}",
                steps=(
                    f"Set lora_alpha={_fmt(a2)} in LoraConfig (or {_fmt(a1)} for scaling 1)",
                    "When you change r later, change lora_alpha with it",
                ),
                config_changes={"lora_alpha": _num(a2)},
            ),
        )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


def _custom_init(ctx: Context, adapter: str) -> bool:
    """True when the adapter's init is not peft's default (the alpha = 2r rule does not hold)."""
    a = ctx.facts.adapters.get(adapter)
    return a is not None and a.init_lora_weights not in (True, "true", None)


CHECKS: tuple[type[Check], ...] = (NoLoraAdapter, AlphaRankRatio)
