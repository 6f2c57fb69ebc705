"""The training set-up, read once when training starts: optimizer, schedule, precision, checkpoints
and the model's own module names (:class:`~lora_doctor.facts.SetupFacts`).

The diagnosis pass judges the causes of a symptom against these facts and builds fixes from them:
the precision actually in use, the model's own target-module names, checkpoints that exist.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from lora_doctor.facts import SetupFacts
from lora_doctor.probes.model import unwrap_model

__all__ = ["checkpoint_steps", "module_kinds", "read_setup"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _str(value: Any) -> str | None:
    """An enum or string argument as its plain value (``SchedulerType.COSINE`` -> ``"cosine"``)."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def module_kinds(model: nn.Module) -> list[str]:
    """The names peft's ``target_modules`` would use for the model's linear layers (the last part
    of each module's name), in model order: ``q_proj``, ``gate_proj`` ... or GPT-2's ``c_attn``,
    ``c_fc``, ``c_proj``. LoRA's own ``lora_A``/``lora_B`` and the output head are left out.

    Example:
        >>> module_kinds(nn.Sequential(nn.Linear(2, 2)))
        ['0']
    """
    kinds: dict[str, None] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] == "base_layer":  # the layer a peft LoRA module wraps: named by its parent
            parts = parts[:-1]
        kind = parts[-1]
        if not name or "lora_" in name or kind in ("lm_head", "score", "classifier"):
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit"):
            kinds.setdefault(kind, None)
    return list(kinds)


def checkpoint_steps(output_dir: str | os.PathLike[str] | None) -> list[int]:
    """The steps of the ``checkpoint-N`` folders in ``output_dir``, sorted (empty when none)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _CHECKPOINT.match(n)))


def read_setup(
    setup: SetupFacts,
    model: Any = None,
    args: Any = None,
    optimizer: Any = None,
    max_steps: int = 0,
) -> SetupFacts:
    """Fills ``setup`` from the model, the ``TrainingArguments`` and the optimizer (each may be
    None); never raises on odd objects.

    Args:
        setup: the facts to fill, in place.
        model: the model being trained (possibly wrapped).
        args: the Trainer's arguments (any object with their attribute names).
        optimizer: the optimizer (its class name is used when ``args`` has no ``optim``).
        max_steps: the planned steps, to turn ``warmup_ratio`` into steps.

    Returns:
        ``setup``.
    """
    if args is not None:
        _read_args(setup, args, max_steps)
    if setup.optimizer is None and optimizer is not None:
        inner = getattr(optimizer, "optimizer", None)
        setup.optimizer = type(inner if hasattr(inner, "param_groups") else optimizer).__name__
    model = unwrap_model(model)
    if isinstance(model, nn.Module):
        _read_model(setup, model)
    return setup


def _read_args(setup: SetupFacts, args: Any, max_steps: int) -> None:
    setup.optimizer = _str(getattr(args, "optim", None))
    setup.lr_scheduler_type = _str(getattr(args, "lr_scheduler_type", None))
    # transformers 5 takes a ratio in warmup_steps (a float below 1); older ones in warmup_ratio
    warmup = _number(getattr(args, "warmup_steps", None)) or 0.0
    ratio = warmup if 0 < warmup < 1 else _number(getattr(args, "warmup_ratio", None)) or 0.0
    setup.warmup_steps = int(warmup) if warmup >= 1 else math.ceil(ratio * max_steps)
    setup.max_grad_norm = _number(getattr(args, "max_grad_norm", None))
    setup.weight_decay = _number(getattr(args, "weight_decay", None))
    for flag in ("fp16", "bf16", "gradient_checkpointing"):
        value = getattr(args, flag, None)
        if isinstance(value, bool):
            setattr(setup, flag, value)
    kwargs = getattr(args, "gradient_checkpointing_kwargs", None)
    if isinstance(kwargs, dict) and isinstance(kwargs.get("use_reentrant"), bool):
        setup.use_reentrant = kwargs["use_reentrant"]
    logging_steps = _number(getattr(args, "logging_steps", None))
    setup.logging_steps = int(logging_steps) if logging_steps and logging_steps >= 1 else None
    setup.save_strategy = _str(getattr(args, "save_strategy", None))
    save_steps = _number(getattr(args, "save_steps", None))
    if setup.save_strategy == "steps" and save_steps:
        setup.save_steps = int(save_steps if save_steps >= 1 else math.ceil(save_steps * max_steps))
    setup.metric_for_best_model = _str(getattr(args, "metric_for_best_model", None))
    better = getattr(args, "greater_is_better", None)
    setup.greater_is_better = better if isinstance(better, bool) else None
    output_dir = getattr(args, "output_dir", None)
    setup.output_dir = str(output_dir) if output_dir else None
    setup.checkpoint_steps = checkpoint_steps(setup.output_dir)


def _read_model(setup: SetupFacts, model: nn.Module) -> None:
    config = getattr(model, "config", None)
    get_config = getattr(model, "get_base_model", None)
    if config is None and callable(get_config):
        config = getattr(get_config(), "config", None)
    vocab = getattr(config, "vocab_size", None)
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        table = embeddings() if callable(embeddings) else None
    except (AttributeError, NotImplementedError, TypeError):
        table = None
    rows = getattr(table, "num_embeddings", None)
    vocab = rows if isinstance(rows, int) and rows > 1 else vocab
    setup.vocab_size = vocab if isinstance(vocab, int) and vocab > 1 else None
    setup.module_kinds = module_kinds(model)
    trainable, frozen = set(), set()
    for p in model.parameters():
        name = _DTYPE.get(p.dtype, str(p.dtype).removeprefix("torch."))
        (trainable if p.requires_grad else frozen).add(name)
    setup.trainable_dtypes = sorted(trainable)
    setup.base_dtypes = sorted(frozen)
    if setup.gradient_checkpointing is None:
        with warnings.catch_warnings():  # transformers 5 deprecates the name; reading it is no harm
            warnings.simplefilter("ignore")
            on = getattr(model, "is_gradient_checkpointing", None)
        setup.gradient_checkpointing = on if isinstance(on, bool) else None
