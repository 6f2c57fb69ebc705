"""The training set-up, read once when training starts: optimizer, schedule, precision, checkpoints
and the model's own module names (:class:`~lora_doctor.facts.SetupFacts`).

The diagnosis pass judges the causes of a symptom against these facts and builds fixes from them:
the precision actually in use, the model's own target-module names, checkpoints that exist.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from lora_doctor.facts import SetupFacts
from lora_doctor.probes.base import Event, Probe
from lora_doctor.probes.view import ModelView, unwrap_optimizer

__all__ = ["SetupProbe", "checkpoint_steps", "read_setup"]

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
    view: ModelView | None = None,
    args: Any = None,
    optimizer: Any = None,
    max_steps: int = 0,
) -> SetupFacts:
    """Fills ``setup`` from the model's shared view, the ``TrainingArguments`` and the optimizer
    (each may be None).

    Args:
        setup: the facts to fill, in place.
        view: the model's view (:class:`~lora_doctor.probes.view.ModelView`).
        args: the Trainer's arguments (any object with their attribute names).
        optimizer: the optimizer (its class name is used when ``args`` has no ``optim``).
        max_steps: the planned steps, to turn a warm-up ratio into steps.

    Returns:
        ``setup``.
    """
    if args is not None:
        _read_args(setup, args, max_steps)
    if setup.optimizer is None and optimizer is not None:
        setup.optimizer = type(unwrap_optimizer(optimizer)).__name__
    if view is not None and view.is_module:
        _read_model(setup, view)
    return setup


class SetupProbe(Probe):
    """Reads the training set-up at train begin (:func:`read_setup`), from the shared view, and
    the checkpoints on disk after each save.

    A run that starts from step 0 in a folder that already holds ``checkpoint-N`` folders finds
    another run's checkpoints there: they are not this run's to go back to, unless this run saves
    one of the same step over them.
    """

    name = "setup"

    def __init__(self) -> None:
        self._stale: set[int] = set()
        self._saved: set[int] = set()

    def train_begin(self, event: Event) -> None:
        facts = event.doctor.facts
        read_setup(facts.setup, event.model_view(), event.args, event.optimizer, facts.max_steps)
        if event.step == 0:  # not resumed: what is on disk is another run's
            self._stale = set(facts.setup.checkpoint_steps)
            facts.setup.checkpoint_steps = []

    def save(self, event: Event) -> None:
        """Reads the checkpoints on disk again: the one just saved is there, and those that
        ``save_total_limit`` removed are gone (a fix names only checkpoints that exist)."""
        self._saved.add(event.step)
        setup = event.doctor.facts.setup
        setup.checkpoint_steps = [
            s
            for s in checkpoint_steps(setup.output_dir)
            if s not in self._stale or s in self._saved
        ]


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


def _read_model(setup: SetupFacts, view: ModelView) -> None:
    model = view.model
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
    text_config = getattr(config, "get_text_config", None)
    try:  # a multimodal model's width is its text model's
        text = text_config(decoder=True) if callable(text_config) else config
    except (AttributeError, TypeError, ValueError):
        text = config
    try:  # GPT-2's n_embd and T5's d_model map to it; a custom config may raise on the name
        width = getattr(text, "hidden_size", None)
    except Exception:
        width = None
    setup.hidden_size = width if type(width) is int and width > 0 else None  # not a bool
    setup.module_kinds = list(view.module_kinds)
    trainable: set[str] = set()
    frozen: set[str] = set()
    for p in view.params:
        name = _DTYPE.get(p.tensor.dtype, str(p.tensor.dtype).removeprefix("torch."))
        (trainable if p.trainable else frozen).add(name)
    setup.trainable_dtypes = sorted(trainable)
    setup.base_dtypes = sorted(frozen)
    on = view.gradient_checkpointing
    if on is not None:  # on when the arguments or the model say so: the Trainer turns it on
        # from the arguments, a user (or an older release, a custom loop) on the model itself
        setup.gradient_checkpointing = on or bool(setup.gradient_checkpointing)
