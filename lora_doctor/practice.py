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

The rates fall slowly with the model's width, about as 1 / sqrt(hidden size): LoRA's own runs used
4e-4 to 5e-4 on RoBERTa-base (hidden size 768) and 3e-4 to 4e-4 on RoBERTa-large (1024) (Hu et al.
2021, "LoRA", appendix D), QLoRA 2e-4 on LLaMA 7B and 13B (4096, 5120) and 1e-4 on 33B and 65B
(6656, 8192) (Dettmers et al. 2023, appendix). The ranges below are those of a 7B model (hidden
size 4096); :func:`lr_range` scales them by sqrt(4096 / hidden size), with the hidden size held to
the 768 to 8192 those sources cover (a smaller model gets a 768-wide model's range, 2.3 times the
7B one; a larger one a 65B model's, 0.71 times).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt

__all__ = ["VLLM_LORA_RANKS", "LrRange", "lr_range", "optimizer_family", "width_factor"]

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
        hidden_size: the model width the range was scaled for (None: unknown, a 7B model's range).
    """

    family: str
    low: float
    high: float
    typical: float
    assumed: bool = False
    full: bool = False
    hidden_size: int | None = None

    def describe(self) -> str:
        """The range in words, e.g. ``"1e-05 to 0.001 with AdamW"``."""
        name = {"adam": "AdamW", "lion": "Lion", "adafactor": "Adafactor", "sgd": "SGD"}[
            self.family
        ]
        what = " for full fine-tuning" if self.full else ""
        who = ", assumed as the optimizer is not known" if self.assumed else ""
        width = _width_text(self.hidden_size)
        return f"{self.low:g} to {self.high:g} with {name}{what}{who}{',' if who and width else ''}{width}"


def _width_text(hidden_size: int | None) -> str:
    """The width a range is for, in words, with the width it was taken at when held to the
    widths the sources cover."""
    held = _held_width(hidden_size)
    if held is None:
        return ""
    if held == hidden_size:
        return f" at hidden size {hidden_size}"
    end = "narrowest" if held == _WIDTHS_COVERED[0] else "widest"
    return f" at hidden size {hidden_size}, as for {held}, the {end} the sources cover"


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

#: The hidden size the ranges of ``_RANGES`` are for (LLaMA 7B), and the widths the sources cover.
_REFERENCE_WIDTH = 4096
_WIDTHS_COVERED = (768, 8192)


def _held_width(hidden_size: int | None) -> int | None:
    """``hidden_size`` held to the widths the sources cover; None when unknown (or not > 0)."""
    if not hidden_size or hidden_size <= 0:
        return None
    low, high = _WIDTHS_COVERED
    return min(max(hidden_size, low), high)


def width_factor(hidden_size: int | None) -> float:
    """How many times a 7B model's learning rates suit a model of ``hidden_size``:
    sqrt(4096 / hidden size), the hidden size held to 768 to 8192 (1.0 when unknown).

    Example:
        >>> width_factor(4096), round(width_factor(64), 3), round(width_factor(8192), 3)
        (1.0, 2.309, 0.707)
    """
    held = _held_width(hidden_size)
    return 1.0 if held is None else sqrt(_REFERENCE_WIDTH / held)


def lr_range(
    optimizer: str | None, *, full: bool = False, hidden_size: int | None = None
) -> LrRange:
    """The usual LoRA learning-rate range for ``optimizer`` (AdamW's, marked assumed, when the
    optimizer is unknown or of no known family); with ``full``, that of a full fine-tune; scaled
    for the model's ``hidden_size`` by :func:`width_factor` (a 7B model's range when it is None).

    Example:
        >>> lr_range("adamw_torch").high, lr_range(None).assumed
        (0.001, True)
        >>> lr_range("adamw_torch", full=True).typical
        2e-05
        >>> lr_range("adamw_torch", hidden_size=768).describe()
        '2.3e-05 to 0.0023 with AdamW at hidden size 768'
        >>> lr_range("adamw_torch", hidden_size=64).describe().split(" with ")[1]
        'AdamW at hidden size 64, as for 768, the narrowest the sources cover'
    """
    family = optimizer_family(optimizer)
    base = _RANGES[family or "adam"]
    scale = (_FULL_FACTOR if full else 1.0) * width_factor(hidden_size)
    return LrRange(
        base.family,
        float(f"{base.low * scale:.2g}"),
        float(f"{base.high * scale:.2g}"),
        float(f"{base.typical * scale:.2g}"),
        assumed=family is None,
        full=full,
        hidden_size=hidden_size if _held_width(hidden_size) else None,
    )
