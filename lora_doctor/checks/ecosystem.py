"""Ecosystem checks: resuming a checkpoint, reinforcement learning ranks, vLLM serving limits."""

from __future__ import annotations

from collections.abc import Iterable

from lora_doctor.checks.base import Check, Context, Phase
from lora_doctor.facts import AdapterFacts, RunFacts
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.practice import VLLM_LORA_RANKS

__all__ = [
    "CHECKS",
    "RankChangedOnResume",
    "RlLowRank",
    "VllmLoraRankTooSmall",
    "is_online_rl",
    "is_online_rl_run",
    "is_rl_or_preference",
]

#: Trainer names (TRL's, and Unsloth's patched ``Unsloth...Trainer``) of online RL: the policy
#: generates, a reward scores it.
_ONLINE_RL = ("GRPO", "RLOO", "PPO", "OnlineDPO", "NashMD", "XPO")
#: Trainer names of offline preference optimisation.
_PREFERENCE = ("DPO", "ORPO", "KTO", "CPO", "BCO", "Reward")


def is_online_rl(trainer: str | None) -> bool:
    """True for an online reinforcement-learning trainer (GRPO, RLOO, PPO, online DPO ...).

    Example:
        >>> is_online_rl("UnslothGRPOTrainer"), is_online_rl("SFTTrainer")
        (True, False)
    """
    return bool(trainer) and any(k in str(trainer) for k in _ONLINE_RL)


def is_online_rl_run(facts: RunFacts) -> bool:
    """True for an online RL run: its trainer is one (:func:`is_online_rl`), or it logs the
    within-group reward statistics of GRPO and kin (``reward_std``, ``frac_reward_zero_std``).

    Example:
        >>> is_online_rl_run(RunFacts(rl_keys=["reward", "reward_std"]))
        True
    """
    return is_online_rl(facts.trainer) or any(
        k in ("reward_std", "frac_reward_zero_std") for k in facts.rl_keys
    )


def is_rl_or_preference(trainer: str | None) -> bool:
    """True for RL or preference trainers, whose loss is no supervised loss curve.

    Example:
        >>> is_rl_or_preference("DPOTrainer"), is_rl_or_preference("Trainer")
        (True, False)
    """
    return is_online_rl(trainer) or (bool(trainer) and any(k in str(trainer) for k in _PREFERENCE))


def _max_rank(adapter: AdapterFacts) -> int | None:
    """The largest rank an adapter uses anywhere (``r`` or a ``rank_pattern`` entry)."""
    ranks = [r for r in (adapter.r, *adapter.rank_pattern.values()) if r is not None]
    return max(ranks) if ranks else None


class RankChangedOnResume(Check):
    """A run resumes a checkpoint whose adapters have another rank than the model it loads into.

    LoRA's A is (r, d_in) and B (d_out, r) from initialisation on (Hu et al. 2021, "LoRA"; peft's
    ``LoraLayer.update_layer``); a checkpoint's tensors only load into the same shapes, and
    ``Trainer.train(resume_from_checkpoint=...)`` stops with "size mismatch for ...lora_A...". A rank
    change is a new run: restart from the base model (DESIGN.md, "Rollback"). Compares each
    adapter's ``r`` and ``rank_pattern`` in the checkpoint's ``adapter_config.json`` with the model's.
    """

    code, slug, severity = "LD130", "rank-changed-on-resume", Severity.ERROR
    phases = frozenset({Phase.SETUP})

    def run(self, ctx: Context) -> Iterable[Finding]:
        facts = ctx.facts
        for name, saved in facts.checkpoint_adapters.items():
            live = facts.adapters.get(name)
            if live is None or saved.r is None or live.r is None:
                continue
            if saved.r == live.r and saved.rank_pattern == live.rank_pattern:
                continue
            yield self._finding(ctx, name, saved, live)

    def _finding(self, ctx: Context, name: str, saved: AdapterFacts, live: AdapterFacts) -> Finding:
        where = ctx.facts.resumed_from or "the checkpoint"
        if saved.r != live.r:
            change = f"r={saved.r} in {where}, r={live.r} in the model you resume"
        else:
            change = (
                f"rank_pattern {saved.rank_pattern} in {where}, {live.rank_pattern} in the model "
                "you resume"
            )
        alpha_old = f", lora_alpha={saved.lora_alpha:g}" if saved.lora_alpha is not None else ""
        # an int, as peft's LoraConfig declares lora_alpha
        alpha_new = round(live.lora_alpha) if live.lora_alpha is not None else 2 * live.r  # type: ignore[operator]
        return self.finding(
            ctx,
            f"Resumed adapter '{name}' with another rank than its checkpoint "
            f"(r {saved.r} -> {live.r})",
            f"Adapter '{name}' has {change}. LoRA shapes are fixed at initialisation (A is r x d_in, "
            "B is d_out x r), so the checkpoint's weights cannot load into the new shapes: "
            "transformers stops with 'size mismatch for ...lora_A...', and no training step of the "
            "old run can continue at the new rank. Resume with the checkpoint's own LoraConfig "
            f"(r={saved.r}{alpha_old}), or start a new run at r={live.r} from the base model.",
            evidence={
                "adapter": name,
                "checkpoint": ctx.facts.resumed_from,
                "checkpoint_r": saved.r,
                "model_r": live.r,
                "checkpoint_rank_pattern": saved.rank_pattern,
                "model_rank_pattern": live.rank_pattern,
            },
            recommendation=Recommendation(
                summary=f"Restart from scratch at r={live.r}, or resume with r={saved.r}",
                steps=(
                    f"Stop: do not resume {where} with r={live.r}",
                    f"To continue the old run: build the model with r={saved.r}{alpha_old} "
                    "(the checkpoint's adapter_config.json) and resume",
                    f"To train at r={live.r}: reload the base model fresh, get_peft_model with "
                    f"r={live.r} and lora_alpha={alpha_new:g}, and call trainer.train() without "
                    "resume_from_checkpoint (from step 0)",
                ),
                config_changes={"r": live.r, "lora_alpha": alpha_new},
                restart_from_scratch=True,
            ),
        )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


class RlLowRank(Check):
    """An online RL (GRPO-style) adapter below the rank RL recipes use.

    GRPO recipes train LoRA at r 64 (Unsloth's GRPO notebooks and docs; DESIGN.md section 3). RL
    takes in few bits per episode, so lower ranks can also work (Schulman et al. 2025, "LoRA Without
    Regret", matched full RL at low ranks): this is information, not a warning.
    """

    code, slug, severity = "LD140", "rl-low-rank", Severity.INFO
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        if not is_online_rl(ctx.facts.trainer):
            return
        target = ctx.config.rl_min_rank
        for name, adapter in ctx.facts.adapters.items():
            r = _max_rank(adapter)
            if r is None or r >= target:
                continue
            yield self.finding(
                ctx,
                f"{ctx.facts.trainer} adapter '{name}' has r={r}, below the r={target} RL recipes use",
                f"Adapter '{name}' trains with r={r} under {ctx.facts.trainer}. GRPO recipes usually "
                f"train r={target}; lower ranks can work because RL takes in little information per "
                f"episode, but if the reward stalls, a start from scratch at r={target} (with "
                f"lora_alpha={target}) is the first thing to try. Silence with "
                "DoctorConfig(ignore={'rl-low-rank'}) if the rank is deliberate.",
                evidence={
                    "adapter": name,
                    "r": r,
                    "expected_r": target,
                    "trainer": ctx.facts.trainer,
                },
                recommendation=Recommendation(
                    summary=f"Consider r={target} for RL if the reward stalls",
                    steps=(
                        f"Keep r={r} while the reward improves",
                        f"If it stalls: start from the base model with r={target}, "
                        f"lora_alpha={target}",
                    ),
                    config_changes={"r": target, "lora_alpha": target},
                    restart_from_scratch=True,
                ),
                step=None,
            )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


class VllmLoraRankTooSmall(Check):
    """The adapter's rank is above the ``max_lora_rank`` of the vLLM engine that generates.

    vLLM allocates its LoRA buffers at ``max_lora_rank`` when the engine starts and refuses an
    adapter of a higher rank (vLLM's ``PEFTHelper.validate_legal``; TRL's async GRPO raises "The
    adapter has rank ..., but the vLLM server was started with --max-lora-rank ..."). Generation,
    and so RL training, then fails at the first weight sync. Reads ``max_lora_rank`` from the vLLM
    engine, the training arguments, or ``DoctorConfig.vllm_max_lora_rank`` for a separate server.
    """

    code, slug, severity = "LD141", "vllm-max-lora-rank", Severity.ERROR
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        limit = ctx.config.vllm_max_lora_rank or ctx.facts.vllm_max_lora_rank
        if limit is None:
            return
        for name, adapter in ctx.facts.adapters.items():
            r = _max_rank(adapter)
            if r is None or r <= limit:
                continue
            fit = next((v for v in VLLM_LORA_RANKS if v >= r), VLLM_LORA_RANKS[-1])
            yield self.finding(
                ctx,
                f"Adapter '{name}' has r={r} but vLLM's max_lora_rank is {limit}",
                f"Generation goes through vLLM, whose LoRA buffers were sized for max_lora_rank="
                f"{limit} when the engine started; adapter '{name}' uses r={r}, so vLLM will refuse "
                "to load it and generation (and the RL run) fails at the first weight sync. Start "
                f"vLLM with max_lora_rank={fit} (--max-lora-rank {fit} for a server; "
                f"max_lora_rank={fit} in Unsloth's from_pretrained), or train at r<={limit}.",
                evidence={"adapter": name, "r": r, "max_lora_rank": limit},
                recommendation=Recommendation(
                    summary=f"Start vLLM with max_lora_rank={fit}, or train at r<={limit}",
                    steps=(
                        f"Set max_lora_rank={fit} where the vLLM engine is made "
                        f"(vllm serve --max-lora-rank {fit}, LLM(max_lora_rank={fit}), or "
                        f"FastLanguageModel.from_pretrained(max_lora_rank={fit}))",
                        f"Or build the adapter with r<={limit} (a new run from the base model)",
                    ),
                ),
                step=None,
            )

    def dedup_key(self, finding: Finding) -> str:
        return str(finding.evidence.get("adapter", ""))


CHECKS: tuple[type[Check], ...] = (RankChangedOnResume, RlLowRank, VllmLoraRankTooSmall)
