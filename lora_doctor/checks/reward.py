"""Reward checks of online RL runs (GRPO and kin): steps whose rewards did not vary.

GRPO's advantage is each completion's reward minus its group's mean (divided by the group's
standard deviation; Shao et al. 2024, "DeepSeekMath", section 4.1): when every completion of a group
gets the same reward, every advantage is zero and so is the gradient. TRL logs the share of such
groups (``frac_reward_zero_std``) and the mean standard deviation of the rewards within a group
(``reward_std``). A step whose groups all tied trains nothing by design; that is a property of the
reward, not a broken adapter, and it is common in the first steps, before the policy ever produces
what the reward pays for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from lora_doctor.checks.base import Check, Context, Phase, Reads
from lora_doctor.findings import Finding, Recommendation, Severity

__all__ = ["CHECKS", "NoRewardVariance", "RewardTies", "tied_steps"]

ZERO_STD_SHARE, REWARD_STD = "frac_reward_zero_std", "reward_std"


@dataclass
class RewardTies:
    """What the check carries between looks: the logged steps, and those with no reward variance."""

    logged: set[float] = field(default_factory=set)
    tied: set[float] = field(default_factory=set)


def tied_steps(
    ties: RewardTies,
    share: tuple[Iterable[float], Iterable[float]],
    std: tuple[Iterable[float], Iterable[float]],
) -> RewardTies:
    """Adds new points of ``frac_reward_zero_std`` (``share``: steps, values) and ``reward_std``
    (``std``) to ``ties`` (in place): a step ties when every group tied (share 1) or the mean
    within-group standard deviation is 0. Non-finite values are skipped.

    Example:
        >>> t = tied_steps(RewardTies(), ([1, 2], [1.0, 0.25]), ([1, 2, 3], [0.0, 0.4, 0.0]))
        >>> sorted(t.tied), len(t.logged)
        ([1, 3], 3)
    """
    for (steps, values), is_tie in ((share, _all_groups_tied), (std, _no_spread)):
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                continue
            ties.logged.add(step)
            if is_tie(value):
                ties.tied.add(step)
    return ties


def _all_groups_tied(share: float) -> bool:
    return share >= 1.0


def _no_spread(std: float) -> bool:
    return std == 0.0


class NoRewardVariance(Check):
    """Logged steps of an online RL run on which every completion of a group got the same reward.

    Information only: those steps have zero advantage and zero gradient by design, so the adapter
    learns only on the others. Reported once ``reward_tied_steps`` logged steps tied; the fixes are
    on the reward's side: partial credit (a denser reward), more completions per prompt
    (``num_generations``), more varied sampling (``temperature``), or easier prompts.
    """

    code, slug, severity = "LD210", "no-reward-variance", Severity.INFO
    phases = frozenset({Phase.LOG, Phase.END})
    reads = (Reads(ZERO_STD_SHARE), Reads(REWARD_STD))
    State = RewardTies

    def run(self, ctx: Context) -> Iterable[Finding]:
        share, std = ctx.points(ZERO_STD_SHARE), ctx.points(REWARD_STD)
        ties = tied_steps(
            ctx.state, (share.new_steps, share.new_values), (std.new_steps, std.new_values)
        )
        if len(ties.tied) < ctx.config.reward_tied_steps:
            return
        tied = sorted(ties.tied)
        shown = ", ".join(str(int(s)) for s in tied[:8]) + (" ..." if len(tied) > 8 else "")
        yield self.finding(
            ctx,
            f"{len(tied)} of {len(ties.logged)} logged steps had no reward variance",
            f"On {len(tied)} of {len(ties.logged)} logged steps (steps {shown}) every completion "
            "of each group got the same reward (frac_reward_zero_std 1 or reward_std 0): the "
            "advantages, hence the gradient, were zero on those steps by design: the adapter "
            "learns only on steps whose rewards differ. This is a property of the reward, not of the adapter; "
            "it is common early, before the policy produces what the reward pays for, and a "
            "problem when it persists.",
            evidence={
                "tied_steps": tied[:50],
                "tied": len(tied),
                "logged": len(ties.logged),
            },
            recommendation=Recommendation(
                summary="Give the rewards variance within a group",
                steps=(
                    "Give partial credit (a denser reward) so completions of a prompt score "
                    "differently",
                    "Sample more completions per prompt: raise num_generations",
                    "Sample more varied completions: raise temperature (e.g. to 1.0)",
                    "Start from prompts the model can sometimes solve",
                ),
            ),
        )


CHECKS: tuple[type[Check], ...] = (NoRewardVariance,)
