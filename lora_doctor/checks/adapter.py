"""Adapter checks: configuration, shapes, parameter budget, targets and trainability."""

from __future__ import annotations

import math
from collections.abc import Iterable

from lora_doctor.checks.base import Check, Context, Phase
from lora_doctor.checks.ecosystem import is_online_rl_run
from lora_doctor.facts import LayerFacts, RunFacts
from lora_doctor.findings import Finding, Recommendation, Severity

__all__ = [
    "CHECKS",
    "AdapterNotInOptimizer",
    "AdapterNotLearning",
    "AdapterShape",
    "AlphaRankRatio",
    "AttentionOnlyTargets",
    "BaseWeightsTrainable",
    "CustomInit",
    "LoraParamBudget",
    "NoLoraAdapter",
    "NoTrainableParams",
    "all_linear_fix",
    "is_attention_module",
]


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


def _layer_scaling(lf: LayerFacts) -> float:
    """The scaling a layer applies: its own reading when live, else from r and alpha."""
    return lf.scaling or _scaling(lf.r, lf.lora_alpha, lf.use_rslora)


def _alpha_for(scale: float, r: int, rslora: bool) -> int:
    """The lora_alpha that gives effective scaling ``scale`` at rank ``r``, to the nearest integer
    (peft's ``LoraConfig`` declares ``lora_alpha: int``; with rsLoRA, sqrt(r) is seldom whole)."""
    return max(1, round(scale * (math.sqrt(r) if rslora else r)))


def _fmt(x: float) -> str:
    return f"{x:.3g}"


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
                and not (low <= _layer_scaling(lf) <= high)
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
        scale = _layer_scaling(first)
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
            f"{direction}. The usual choice is a scaling of 1 to 2 (lora_alpha = r or 2r), which "
            "keeps the effective learning rate the same whatever r is; a deliberate scaling off "
            "the rule can train well (QLoRA used r 64 with alpha 16)."
        )
        if not uniform:
            message += " Scalings differ between layers: " + ", ".join(
                f"{lf.name}: r={lf.r}, alpha={_fmt(lf.lora_alpha)}" for lf in odd[:8]
            )
        return self.finding(
            ctx,
            f"{formula} scaling is {_fmt(scale)} in {where}",
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
                summary=f"Set lora_alpha={_fmt(a2)} (scaling 2) or {_fmt(a1)} (scaling 1) for "
                f"r={first.r}",
                steps=(
                    f"Set lora_alpha={_fmt(a2)} in LoraConfig (or {_fmt(a1)} for scaling 1)",
                    "When you change r later, change lora_alpha with it",
                    "If the scaling is deliberate, silence this with "
                    "DoctorConfig(ignore={'alpha-rank-ratio'})",
                ),
                config_changes={"lora_alpha": a2},
            ),
        )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


def _custom_init(ctx: Context, adapter: str) -> bool:
    """True when the adapter's init is not peft's default (the alpha = 2r rule does not hold)."""
    a = ctx.facts.adapters.get(adapter)
    return a is not None and a.init_lora_weights not in (True, "true", None)


def _names(names: list[str], limit: int = 5) -> str:
    """A short list of names for a message: the first few, then how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _n(count: int, noun: str, plural: str = "") -> str:
    """``count`` and the noun, singular or plural: ``_n(1, "layer")`` is "1 layer"."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def _pct(share: float) -> str:
    return f"{100 * share:.3g}%"


def _live(ctx: Context) -> bool:
    """True when the facts come from a live model (layers read), not from saved files."""
    return bool(ctx.facts.layers)


class NoTrainableParams(Check):
    """Nothing would train: no LoRA parameter has ``requires_grad``.

    A frozen adapter is the classic silent failure: ``PeftModel.from_pretrained`` loads adapters for
    inference (``is_trainable=False``) unless told otherwise, and a ``requires_grad_(False)`` loop
    after ``get_peft_model`` freezes the adapters too. The loss then stays flat (or the backward
    pass fails) with no other hint (peft docs, "Load adapters": ``is_trainable``).
    """

    code, slug, severity = "LD101", "no-trainable-params", Severity.ERROR
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        facts = ctx.facts
        if not _live(ctx) or facts.trainable_lora_params > 0:
            return
        others = facts.trainable_params - facts.trainable_lora_params
        what = (
            "no parameter of the model is trainable: the optimizer has nothing to update"
            if others <= 0
            else f"only {others:,} non-LoRA parameters are (e.g. modules_to_save heads), so the "
            "adapters will not learn"
        )
        yield self.finding(
            ctx,
            f"None of the {facts.lora_params:,} LoRA parameters is trainable",
            f"The model has {len(facts.layers)} LoRA layers but no LoRA parameter has "
            f"requires_grad=True; {what}. This happens when adapters are loaded with "
            "PeftModel.from_pretrained(...) without is_trainable=True, or when a loop sets "
            "requires_grad=False after get_peft_model.",
            evidence={
                "lora_params": facts.lora_params,
                "trainable_lora_params": facts.trainable_lora_params,
                "trainable_params": facts.trainable_params,
                "lora_layers": len(facts.layers),
            },
            recommendation=Recommendation(
                summary="Make the LoRA parameters trainable before building the Trainer",
                steps=(
                    "Load saved adapters with PeftModel.from_pretrained(base, path, "
                    "is_trainable=True)",
                    "Do not set requires_grad=False on parameters after get_peft_model; check with "
                    "model.print_trainable_parameters()",
                ),
            ),
        )


class AdapterNotInOptimizer(Check):
    """Trainable LoRA parameters that no optimizer param group holds.

    An optimizer built from the base model's parameters before ``get_peft_model`` (or from a
    filtered list) never updates the adapters: they get gradients, but their weights never change
    (PyTorch ``torch.optim`` only updates the tensors in its ``param_groups``).
    """

    code, slug, severity = "LD102", "adapter-not-in-optimizer", Severity.ERROR
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        missing = ctx.facts.not_in_optimizer
        if not missing:
            return
        yield self.finding(
            ctx,
            f"{_n(len(missing), 'trainable LoRA parameter')} in no optimizer param group",
            f"The optimizer does not hold {_n(len(missing), 'trainable LoRA parameter')} "
            f"({_names(missing)}): they get gradients but are never updated, so the adapter does "
            "not learn. This happens when the optimizer is built before get_peft_model, or from "
            "a list that leaves the LoRA parameters out.",
            evidence={"missing": missing, "count": len(missing)},
            recommendation=Recommendation(
                summary="Build the optimizer from the PEFT model's trainable parameters",
                steps=(
                    "Call get_peft_model before creating the optimizer",
                    "Build it as torch.optim.AdamW([p for p in model.parameters() if "
                    "p.requires_grad], lr=...), or let the Trainer make it (optimizers=(None, None))",
                ),
            ),
        )


class LoraParamBudget(Check):
    """LoRA parameters outside the usual 0.05% to 1% of the base model's parameters.

    LoRA adapters usually hold 0.1% to 1% of the base model's parameters (Hu et al. 2021 report
    0.01% to 0.1% for GPT-3 at r 1-8 on q/v; a 7B Llama at r 16 on all linear layers has about 40M,
    0.6%). Far below, the adapter may lack capacity; far above, it costs memory and time without the
    parameter saving LoRA is for, and overfits small datasets. Counts exclude modules_to_save copies
    and count 4-bit weights at their true size; each adapter is judged on its own. A warning only
    when the share is ``budget_warn_factor`` times beyond the range on a base model of at least
    ``budget_min_base_params`` parameters (r 16 on all linear layers of a 0.8B model is 1.1%: info);
    otherwise info.
    """

    code, slug, severity = "LD111", "lora-param-budget", Severity.WARNING
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        facts, cfg = ctx.facts, ctx.config
        if facts.base_params <= 0:
            return
        counts = dict(facts.lora_params_by_adapter) or (
            {"(all adapters)": facts.lora_params} if facts.lora_params > 0 else {}
        )
        for adapter, count in counts.items():
            share = count / facts.base_params
            if cfg.budget_low <= share <= cfg.budget_high:
                continue
            yield self._finding(ctx, adapter, count, share)

    def _severity(self, ctx: Context, share: float) -> tuple[Severity, str]:
        """Warning when far off the range on a model the rule is made for, else info (and why)."""
        cfg = ctx.config
        if ctx.facts.base_params < cfg.budget_min_base_params:
            return Severity.INFO, (
                f" The base model has fewer than {cfg.budget_min_base_params:,} parameters, where "
                "the rule of thumb (made on 1B to 70B models) says little: info only."
            )
        far = share < cfg.budget_low / cfg.budget_warn_factor or (
            share > cfg.budget_high * cfg.budget_warn_factor
        )
        if far:
            return Severity.WARNING, ""
        return Severity.INFO, (
            f" Within {cfg.budget_warn_factor:g}x of the range: info, not a problem by itself."
        )

    def _finding(self, ctx: Context, adapter: str, count: int, share: float) -> Finding:
        cfg = ctx.config
        base = ctx.facts.base_params
        severity, note = self._severity(ctx, share)
        a = ctx.facts.adapters.get(adapter)
        r = a.r if a is not None else None
        low = share < cfg.budget_low
        bound = cfg.budget_low if low else cfg.budget_high
        new_r = _rank_for_share(r, share, bound, low) if r else None
        if low:
            why = (
                "a very small adapter may lack the capacity to learn the task (the loss then "
                "plateaus early)"
            )
            summary = f"Raise r to {new_r}" if new_r else "Raise r"
            fix = (
                f"{summary} (with lora_alpha = r or 2r), or target all linear layers "
                "(target_modules='all-linear')"
            )
        else:
            why = (
                "a large adapter costs memory and time without LoRA's parameter saving, and "
                "overfits small datasets"
            )
            summary = f"Lower r to {new_r}" if new_r else "Lower r"
            fix = f"{summary} (with lora_alpha = r or 2r), or target fewer modules"
        changes: dict[str, int] = {"r": new_r, "lora_alpha": 2 * new_r} if new_r else {}
        return self.finding(
            ctx,
            f"LoRA parameters are {_pct(share)} of the base model (adapter '{adapter}')",
            f"Adapter '{adapter}' has {count:,} LoRA parameters, {_pct(share)} of the base "
            f"model's {base:,} (expected {_pct(cfg.budget_low)} to {_pct(cfg.budget_high)}; a 7B "
            f"model at r 16 on all linear layers has about 40M, 0.6%): {why}." + note,
            evidence={
                "adapter": adapter,
                "lora_params": count,
                "base_params": base,
                "share": share,
                "expected_share": [cfg.budget_low, cfg.budget_high],
                "r": r,
            },
            recommendation=Recommendation(
                summary=summary,
                steps=(
                    fix,
                    "Restart training from step 0: a new rank changes the adapter shapes",
                    "If the size is deliberate, silence this with "
                    "DoctorConfig(ignore={'lora-param-budget'})",
                ),
                config_changes=changes,
                restart_from_scratch=bool(changes),
            ),
            severity=severity,
        )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


def _rank_for_share(r: int, share: float, bound: float, up: bool) -> int | None:
    """The power-of-two rank whose share of the base is just inside ``bound`` (share scales with r)."""
    target = r * bound / share
    if up:
        new = 1 << max(0, math.ceil(math.log2(max(target, 1.0))))
    else:
        if target < 1:
            return None
        new = 1 << math.floor(math.log2(target))
    return new if new != r else None


#: Leaf module names that are attention projections whatever their path.
_ATTENTION_LEAVES = frozenset(
    {
        "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value",
        "query_key_value", "wqkv", "c_attn", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
        "kv_b_proj", "in_proj", "to_q", "to_k", "to_v", "to_out",
    }
)  # fmt: skip


def is_attention_module(path: str) -> bool:
    """True when a module path names an attention projection.

    By the leaf name (q_proj, query, query_key_value, Wqkv, c_attn ...) or by a path component
    that is an attention block (``.attn.``, ``self_attn``, ``attention.self``, T5's
    ``SelfAttention``), so that GPT-2's ``attn.c_proj`` counts and ``mlp.c_proj`` does not.

    Example:
        >>> is_attention_module("transformer.h.0.attn.c_proj"), is_attention_module("h.0.mlp.c_proj")
        (True, False)
    """
    parts = [p.lower() for p in path.split(".")]
    if parts[-1] in _ATTENTION_LEAVES:
        return True
    return any("attn" in p or "attention" in p for p in parts[:-1])


def all_linear_fix(facts: RunFacts) -> Recommendation:
    """The fix for adapters on attention only, in the model's own module names.

    The model's linear module kinds (``facts.setup.module_kinds``, read live) become the new
    ``target_modules`` and the fix names the ones it adds (GPT-2: ``c_proj``, ``c_fc``; Llama:
    ``gate_proj``, ``up_proj``, ``down_proj`` and the attention projections not yet targeted);
    where they are not known (offline), peft's ``'all-linear'``, which resolves to them on any
    model.

    Example:
        >>> from lora_doctor.facts import AdapterFacts, SetupFacts
        >>> gpt2 = RunFacts(
        ...     adapters={"default": AdapterFacts(target_modules=["c_attn"])},
        ...     setup=SetupFacts(module_kinds=["c_attn", "c_proj", "c_fc"]),
        ... )
        >>> fix = all_linear_fix(gpt2)
        >>> fix.config_changes, fix.steps[0]
        ({'target_modules': ['c_attn', 'c_proj', 'c_fc']}, "Set target_modules=['c_attn', 'c_proj', 'c_fc'] in LoraConfig (every linear layer of this model; adds c_proj, c_fc), with more memory as the cost")
    """
    kinds = list(facts.setup.module_kinds)
    targeted = {lf.name.rsplit(".", 1)[-1] for lf in facts.layers} | {
        t
        for a in facts.adapters.values()
        if isinstance(a.target_modules, list)
        for t in a.target_modules
    }
    added = [k for k in kinds if k not in targeted]
    mlp = [k for k in added if not is_attention_module(k)]
    targets: str | list[str] = kinds if mlp else "all-linear"
    what = (
        f"every linear layer of this model; adds {', '.join(added)}"
        if added
        else "every linear layer but the output head"
    )
    return Recommendation(
        summary=f"Target every linear layer: target_modules={targets!r}",
        steps=(
            f"Set target_modules={targets!r} in LoraConfig ({what}), with more memory as the cost",
            "Restart training from step 0: new target modules mean new adapter layers",
        ),
        config_changes={"target_modules": targets},
        restart_from_scratch=True,
    )


class AttentionOnlyTargets(Check):
    """Adapters only on attention projections.

    QLoRA (Dettmers et al. 2023) found that LoRA matches full fine-tuning only when it is applied
    to all linear layers; adapters on q/v alone (peft's old default, from Hu et al. 2021) leave the
    MLP, most of the model's parameters, untouched, a common cause of an early plateau. Attention is
    recognised by the module path, not only the q_proj/v_proj names: GPT-2's c_attn and
    ``attn.c_proj``, BERT's ``attention.self.query``, query_key_value, Wqkv.
    """

    code, slug, severity = "LD112", "attention-only-targets", Severity.INFO
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        for adapter, names in self._targets(ctx).items():
            if names and all(is_attention_module(n) for n in names):
                yield self._finding(ctx, adapter, names)

    def _targets(self, ctx: Context) -> dict[str, list[str]]:
        """Targeted module paths by adapter: the live layers, else the config's name list."""
        out: dict[str, list[str]] = {}
        for lf in ctx.facts.layers:
            out.setdefault(lf.adapter, []).append(lf.name)
        for name, a in ctx.facts.adapters.items():
            if name not in out and isinstance(a.target_modules, list):
                out[name] = list(a.target_modules)
        return out

    def _finding(self, ctx: Context, adapter: str, names: list[str]) -> Finding:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        return self.finding(
            ctx,
            f"Adapter '{adapter}' targets attention projections only ({', '.join(leaves)})",
            f"Adapter '{adapter}' adapts {len(names)} modules, all attention projections "
            f"({', '.join(leaves)}); the MLP layers, most of the model's weights, stay as they are. "
            "QLoRA found that LoRA matches full fine-tuning only on all linear layers, and "
            "attention-only adapters are a common cause of an early loss plateau.",
            evidence={"adapter": adapter, "targets": leaves, "modules": len(names)},
            recommendation=all_linear_fix(ctx.facts),
        )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


#: What each non-default ``init_lora_weights`` does, for the message.
_INIT_NOTES = {
    "gaussian": "A drawn from a Gaussian scaled by 1/r instead of Kaiming-uniform (B still zero)",
    "pissa": "A and B start from the base weight's principal singular vectors (PiSSA), and the base "
    "weight is changed to the residual",
    "olora": "A and B start from a QR decomposition of the base weight (OLoRA), and the base weight "
    "is changed",
    "loftq": "A and B start from the quantization error of the base weight (LoftQ)",
    "eva": "A starts from the activations' principal directions (EVA), with a data-driven rank",
    "corda": "A and B start from a context-oriented decomposition of the base weight (CorDA)",
    "orthogonal": "A and B start orthogonal and non-zero",
    "lora_ga": "A and B start from the gradients' decomposition (LoRA-GA)",
    "mica": "A and B start from the base weight's minor singular components (MiCA)",
}


def _init_scheme(value: object) -> str:
    """The family of an ``init_lora_weights`` value (``pissa_niter_4`` is pissa)."""
    text = str(value).lower()
    return next((k for k in _INIT_NOTES if text.startswith(k)), text)


class CustomInit(Check):
    """``init_lora_weights`` is not peft's default.

    The default (Kaiming-uniform A, zero B; Hu et al. 2021) makes the adapter start as a no-op, and
    the alpha = r or 2r rule is calibrated on it. Other schemes (Gaussian, PiSSA, OLoRA, LoftQ, EVA,
    CorDA, orthogonal, LoRA-GA) start from other weights, and their papers tune alpha and the
    learning rate for them; ``False`` leaves A and B random, so the model's outputs change before the
    first step (peft: "only for debugging").
    """

    code, slug, severity = "LD113", "custom-init", Severity.INFO
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        for name, a in ctx.facts.adapters.items():
            if not _custom_init(ctx, name):
                continue
            value = a.init_lora_weights
            if value is False or str(value).lower() == "false":
                yield self.finding(
                    ctx,
                    f"Adapter '{name}' uses init_lora_weights=False: A and B start random",
                    f"init_lora_weights=False leaves adapter '{name}' with random A and B, so the "
                    "model's outputs change before the first step and training starts from a "
                    "damaged model; peft meant this for debugging (the default, True, starts B at "
                    "zero).",
                    evidence={"adapter": name, "init_lora_weights": False},
                    recommendation=Recommendation(
                        summary="Use the default init: init_lora_weights=True",
                        steps=("Set init_lora_weights=True (or drop the argument) and restart",),
                        config_changes={"init_lora_weights": True},
                        restart_from_scratch=True,
                    ),
                    severity=Severity.WARNING,
                )
                continue
            scheme = _init_scheme(value)
            note = _INIT_NOTES.get(
                scheme, "a scheme other than the default Kaiming-uniform A, zero B"
            )
            yield self.finding(
                ctx,
                f"Adapter '{name}' uses init_lora_weights={value!r}",
                f"Adapter '{name}' is initialised with init_lora_weights={value!r}: {note}. The "
                "alpha = r or 2r rule and the usual LoRA learning rates are calibrated on the "
                "default init and no longer hold: take lora_alpha and the learning rate from the "
                f"{scheme} recipe (lora-doctor does not judge alpha-rank-ratio for this adapter).",
                evidence={"adapter": name, "init_lora_weights": value, "scheme": scheme},
            )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


class BaseWeightsTrainable(Check):
    """Base-model weights that LoRA should leave frozen are trainable.

    ``get_peft_model`` freezes the base model and trains only the adapters (plus ``modules_to_save``
    and, with ``bias='all'``/``'lora_only'``, biases). A base weight made trainable afterwards (a
    ``requires_grad_(True)`` loop, ``model.train()`` mix-ups with custom code, a layer unfrozen by
    hand) trains at full size: its gradient and optimizer state cost memory, and the saved adapter
    does not contain it, so the change is lost at ``save_pretrained`` (peft docs,
    ``modules_to_save``).
    """

    code, slug, severity = "LD122", "base-weights-trainable", Severity.WARNING
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        facts = ctx.facts
        names = facts.trainable_base
        if not names:
            return
        share = facts.trainable_base_params / facts.base_params if facts.base_params else 0.0
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        yield self.finding(
            ctx,
            f"{_n(len(names), 'base-model parameter')} trainable ({facts.trainable_base_params:,} "
            f"values, {_pct(share)} of the base)",
            f"Base-model parameters have requires_grad=True ({_names(names)}) although LoRA "
            f"should leave the base frozen: {facts.trainable_base_params:,} values train at full size, with gradients and optimizer state in memory, and "
            "save_pretrained does not save them, so their training is lost.",
            evidence={
                "parameters": names,
                "modules": modules,
                "trainable_base_params": facts.trainable_base_params,
                "share_of_base": share,
            },
            recommendation=Recommendation(
                summary="Freeze the base weights, or train them through modules_to_save",
                steps=(
                    "Remove the code that sets requires_grad=True on base parameters",
                    f"Or set modules_to_save={sorted({m.rsplit('.', 1)[-1] for m in modules})[:5]} "
                    "in LoraConfig so they are trained and saved on purpose",
                ),
            ),
        )


class AdapterShape(Check):
    """An adapter whose A is not (r, d_in) or B not (d_out, r), or a full-rank "low-rank" pair.

    LoRA replaces the update of a d_out x d_in weight by B @ A with A (r, d_in) and B (d_out, r)
    (Hu et al. 2021). Shapes are read at their true size under DeepSpeed ZeRO-3 (``ds_shape``),
    FSDP (flat parameters) and 4-bit bases; GPT-2's Conv1D (fan_in_fan_out) stores its base weight
    transposed but its LoRA pair in the usual orientation, and DoRA's magnitude vector is expected.
    With r >= min(d_in, d_out) the pair is at least as large as the matrix it adapts: a full-size
    update where a low-rank pair belongs.
    """

    code, slug, severity = "LD120", "adapter-shape", Severity.ERROR
    phases = frozenset({Phase.FIRST_STEPS})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        wrong = [(lf, why) for lf in ctx.facts.layers if (why := _shape_problem(lf))]
        if wrong:
            lf, why = wrong[0]
            yield self.finding(
                ctx,
                f"{_n(len(wrong), 'LoRA layer')} with unexpected adapter shapes",
                f"In {_n(len(wrong), 'LoRA layer')} the low-rank pair does not match the layer: "
                f"{lf.name} ({lf.adapter}): {why}"
                + (f"; also {_names([w.name for w, _ in wrong[1:]])}" if len(wrong) > 1 else "")
                + ". The adapter then does not compute the update LoRA intends (often a checkpoint "
                "saved with another rank or for another model).",
                evidence={
                    "layers": [
                        {"name": w.name, "adapter": w.adapter, "problem": p} for w, p in wrong
                    ]
                },
                recommendation=Recommendation(
                    summary="Re-create the adapter for this base model and restart",
                    steps=(
                        "Stop training",
                        "Build the adapter with get_peft_model(base, LoraConfig(...)) on this "
                        "base, or load the checkpoint saved for it",
                        "Never resume a checkpoint saved with another rank",
                    ),
                    restart_from_scratch=True,
                ),
            )
        full: list[tuple[LayerFacts, int, int]] = []
        for layer in ctx.facts.layers:
            if (dims := _full_rank(layer)) is not None:
                full.append((layer, *dims))
        if full:
            lf, d_in, d_out = full[0]
            yield self.finding(
                ctx,
                f"{_n(len(full), 'LoRA layer')} at full rank (r={lf.r} >= min(d_in, d_out))",
                f"In {_n(len(full), 'layer')} (e.g. {lf.name}: r={lf.r}, d_in={d_in}, d_out={d_out}) "
                "the rank is at least the smaller side of the matrix, so A and B hold "
                f"{lf.r * (d_in + d_out):,} parameters for a {d_in * d_out:,}-parameter matrix: a "
                "full-size update where a low-rank pair belongs, with none of LoRA's savings.",
                evidence={
                    "layers": [
                        {"name": f.name, "adapter": f.adapter, "r": f.r, "d_in": i, "d_out": o}
                        for f, i, o in full
                    ]
                },
                recommendation=Recommendation(
                    summary=f"Lower r below {min(d_in, d_out)} for these layers",
                    steps=(
                        "Set a smaller r (or a rank_pattern entry for these layers) and restart",
                        "Or train these modules fully: list them in modules_to_save instead",
                    ),
                    restart_from_scratch=True,
                ),
                severity=Severity.WARNING,
            )

    def dedup_key(self, finding: Finding) -> str:
        return finding.severity.value


def _full_rank(lf: LayerFacts) -> tuple[int, int] | None:
    """(d_in, d_out) of a layer whose rank reaches min(d_in, d_out); None otherwise or unknown."""
    if lf.d_in and lf.d_out and lf.r >= min(lf.d_in, lf.d_out):
        return lf.d_in, lf.d_out
    return None


def _shape_problem(lf: LayerFacts) -> str:
    """Why a layer's A/B shapes do not fit (r, d_in) / (d_out, r); empty when they fit or are
    unknown."""
    if lf.a_shape is None or lf.b_shape is None or lf.r <= 0:
        return ""
    a, b = lf.a_shape, lf.b_shape
    if lf.kind == "conv":  # conv pairs: A (r, in/groups, *k), B (out, r, 1, ...)
        ok = a[0] == lf.r and b[:2] == (lf.d_out, lf.r)
        want = f"A ({lf.r}, ...), B ({lf.d_out}, {lf.r}, ...)"
    else:
        ok = a == (lf.r, lf.d_in) and b == (lf.d_out, lf.r)
        want = f"A ({lf.r}, {lf.d_in}), B ({lf.d_out}, {lf.r})"
    if ok or lf.d_in is None or lf.d_out is None:
        return ""
    return f"A is {a}, B is {b}, expected {want} for r={lf.r}"


class AdapterNotLearning(Check):
    """After the first optimizer steps the adapters got no gradient, or B has not moved from zero.

    Read from the live run: which LoRA layers got a non-zero gradient in the first
    ``check_after_steps`` steps (``on_pre_optimizer_step``, while gradients exist), and whether A
    and B moved from their values at the start. "Moved" is judged against that copy, not against
    zero, so init schemes whose B does not start at zero (PiSSA, OLoRA, orthogonal) are no false
    alarm; steps with a zero learning rate (warm-up) or skipped for fp16 overflow are not counted.
    With the default init B starts at zero, so a B still zero means the adapter changes nothing
    (Hu et al. 2021; peft ``init_lora_weights``). An error when every active layer is stuck; a
    warning when only some are (MoE experts or modality towers may not have seen data yet).
    Quiet on an online RL run (GRPO and kin) whose stuck layers all got gradients of exact zeros
    (not None): a group whose completions all got the same reward has zero advantage, hence zero
    gradient, by design (``no-reward-variance`` reports those steps); a frozen adapter there
    (requires_grad False, or no gradient at all) is still an error.
    """

    code, slug, severity = "LD121", "adapter-not-learning", Severity.ERROR
    phases = frozenset({Phase.FIRST_STEPS})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        facts = ctx.facts
        no_grad, b_zero, frozen = (
            facts.no_grad_layers,
            facts.b_still_zero_layers,
            facts.frozen_in_place,
        )
        stuck = list(dict.fromkeys([*no_grad, *b_zero, *frozen]))
        if not stuck:
            return
        if is_online_rl_run(facts) and set(stuck) <= set(facts.zero_grad_layers):
            return  # no reward variance in the first steps: zero gradients by design
        total = sum(1 for lf in facts.layers if lf.active) or len(facts.layers)
        steps = ctx.config.check_after_steps
        parts = []
        if no_grad:
            zeros = len(facts.zero_grad_layers)
            parts.append(
                f"{len(no_grad)} got no gradient"
                + (f" ({zeros} only gradients of exact zeros)" if zeros else "")
            )
        if b_zero:
            parts.append(f"{len(b_zero)} still have B exactly zero")
        if frozen:
            parts.append(f"{len(frozen)} did not change at all")
        partial = len(stuck) < total
        note = (
            " Some layers can legitimately wait for their first gradient: MoE experts no token "
            "was routed to yet, or a vision tower these batches did not use; if so, ignore this "
            "warning."
            if partial
            else ""
        )
        yield self.finding(
            ctx,
            f"{len(stuck)} of {total} LoRA layers are not learning after {steps} steps",
            f"After {steps} optimizer steps, of {total} active LoRA layers "
            + ", ".join(parts)
            + f" (e.g. {_names(stuck, 3)}). These adapters change nothing and the run trains "
            f"nothing useful in them.{note}",
            evidence={
                "no_grad_layers": no_grad,
                "zero_grad_layers": facts.zero_grad_layers,
                "b_still_zero_layers": b_zero,
                "frozen_in_place": frozen,
                "active_layers": total,
                "after_steps": steps,
                "trainable_lora_params": facts.trainable_lora_params,
            },
            recommendation=Recommendation(
                summary="Make the adapters train, then restart",
                steps=("Stop training: these steps did not train the adapters",),
                restart_from_scratch=True,
            ),
            # Every layer stuck is certain trouble; some layers may be waiting for their data.
            severity=Severity.WARNING if partial else Severity.ERROR,
        )


CHECKS: tuple[type[Check], ...] = (
    NoLoraAdapter,
    NoTrainableParams,
    AdapterNotInOptimizer,
    AlphaRankRatio,
    LoraParamBudget,
    AttentionOnlyTargets,
    CustomInit,
    BaseWeightsTrainable,
    AdapterShape,
    AdapterNotLearning,
)
