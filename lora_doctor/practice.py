"""What LoRA practice says about learning rates, by optimizer: the ranges the checks and the
diagnosis pass judge a run's learning rate against, and the value a fix sets.

Sources: the QLoRA paper (Dettmers et al. 2023) trains at 2e-4 with paged AdamW; LoRA with AdamW
is usually run at 1e-4 to 5e-4, about ten times the full fine-tuning rate (DESIGN.md section 3;
Raschka, "Practical Tips for Finetuning LLMs Using LoRA", 2023; Biderman et al. 2024, "LoRA Learns
Less and Forgets Less": LoRA wants a higher rate than full fine-tuning and is sensitive to it), and
runs far above 1e-3 diverge, spike or stall high. Lion takes a rate 3 to 10 times smaller than
AdamW's (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"). SGD with momentum
needs rates about 100 times larger than Adam's for the same step size. Adafactor with an explicit
rate is used near 1e-3 (Shazeer & Stern 2018; T5 fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VLLM_LORA_RANKS", "LrRange", "lr_range", "optimizer_family"]

#: The values vLLM accepts for ``max_lora_rank`` (TRL's ``VLLM_LORA_RANKS``, from vLLM's LoRAConfig).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LrRange:
    """The learning rates LoRA runs use with one optimizer family.

    Attributes:
        family: ``"adam"``, ``"lion"``, ``"adafactor"`` or ``"sgd"``.
        low, high: the usual range; far below ``low`` a LoRA adapter barely moves, far above
            ``high`` runs diverge, spike or stall high.
        typical: the value a fix sets when the run shows no better one.
        assumed: True when the optimizer is not known and AdamW (the Trainer's default) is assumed.
        full: True for the ranges of full fine-tuning (no LoRA), about ten times lower.
    """

    family: str
    low: float
    high: float
    typical: float
    assumed: bool = False
    full: bool = False

    def describe(self) -> str:
        """The range in words, e.g. ``"1e-05 to 0.001 with AdamW"``."""
        name = {"adam": "AdamW", "lion": "Lion", "adafactor": "Adafactor", "sgd": "SGD"}[
            self.family
        ]
        who = f"{name} (assumed: the optimizer is not known)" if self.assumed else name
        what = " for full fine-tuning" if self.full else ""
        return f"{self.low:g} to {self.high:g} with {who}{what}"


_RANGES = {
    "adam": LrRange("adam", 1e-5, 1e-3, 2e-4),
    "lion": LrRange("lion", 1e-6, 3e-4, 5e-5),
    "adafactor": LrRange("adafactor", 1e-5, 3e-3, 1e-3),
    "sgd": LrRange("sgd", 1e-3, 1e-1, 1e-2),
}


def optimizer_family(optimizer: str | None) -> str | None:
    """The family of an optimizer named by ``TrainingArguments.optim`` or by its class.

    Example:
        >>> optimizer_family("paged_adamw_8bit"), optimizer_family("SGD"), optimizer_family(None)
        ('adam', 'sgd', None)
    """
    if not optimizer:
        return None
    name = optimizer.lower()
    for family in ("lion", "adafactor", "sgd"):
        if family in name:
            return family
    if "adam" in name or name in ("lomo", "adalomo", "galore", "apollo", "schedule_free"):
        return "adam"
    return None


#: Full fine-tuning (every weight trained, no LoRA) runs at about a tenth of LoRA's rates (LoRA
#: wants about 10x the full fine-tuning rate; full SFT of LLMs with AdamW: 1e-5 to 5e-5).
_FULL_FACTOR = 0.1


def lr_range(optimizer: str | None, *, full: bool = False) -> LrRange:
    """The usual LoRA learning-rate range for ``optimizer`` (AdamW's, marked assumed, when the
    optimizer is unknown or of no known family); with ``full``, that of a full fine-tune.

    Example:
        >>> lr_range("adamw_torch").high, lr_range(None).assumed
        (0.001, True)
        >>> lr_range("adamw_torch", full=True).typical
        2e-05
    """
    family = optimizer_family(optimizer)
    base = _RANGES[family or "adam"]
    if family is not None and not full:
        return base
    scale = _FULL_FACTOR if full else 1.0
    return LrRange(
        base.family,
        float(f"{base.low * scale:.3g}"),
        float(f"{base.high * scale:.3g}"),
        float(f"{base.typical * scale:.3g}"),
        assumed=family is None,
        full=full,
    )
