"""The facts that confirm or refute why training died, read from the Trainer when it dies.

:func:`record_crash` is called by the callback's train guard (and :func:`lora_doctor.watch`) with the
exception escaping training; it reads the Trainer's tokenizer, model, arguments and data collator into
a :class:`~lora_doctor.diagnosis.crashes.CrashFacts` and stores the crash in ``RunFacts.crash``, where
the ``training-died`` check classifies it at the END phase. Every fact is read on its own guard: one
that cannot be read stays unknown, and nothing here ever raises. Nothing is synchronized on the device
and nothing is changed: parameters are only looked at (dtype, device, ``requires_grad``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lora_doctor.diagnosis.crashes import Crash, CrashFacts

if TYPE_CHECKING:
    from lora_doctor.engine import Doctor

__all__ = ["gather_crash_facts", "rank_report_path", "record_crash"]

logger = logging.getLogger("lora_doctor")

_T = TypeVar("_T")

#: Names of the forward hook transformers' (and peft's) ``enable_input_require_grads`` installs.
_INPUT_GRAD_HOOKS = frozenset({"make_inputs_require_grads"})


def _read(fn: Callable[[], _T], default: _T) -> _T:
    """``fn()``, or ``default`` when it raises: a fact that cannot be read stays unknown."""
    try:
        return fn()
    except Exception:
        return default


def _dtype(param: Any) -> str:
    return str(param.dtype).replace("torch.", "")


def _tokenizer(trainer: Any) -> Any:
    """The tokenizer that pads the batches: the data collator's, else the Trainer's own."""
    collator = getattr(trainer, "data_collator", None)
    tok = getattr(collator, "tokenizer", None)
    if tok is None:
        tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    inner = getattr(tok, "tokenizer", None)  # a processor wraps its tokenizer
    return inner if inner is not None and hasattr(inner, "pad_token") else tok


def _fill_tokenizer(facts: CrashFacts, tok: Any) -> None:
    if tok is None or not hasattr(tok, "pad_token"):
        return
    facts.has_tokenizer = True
    facts.tokenizer = type(tok).__name__
    facts.tokenizer_len = _read(lambda: len(tok), None)
    for name in ("pad_token", "eos_token", "unk_token"):
        try:
            value = getattr(tok, name)
        except Exception:  # a tokenizer may raise for an unset special token
            value = None
        setattr(facts, name, str(value) if value is not None else None)


def _module_name(model: Any, module: Any) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return str(name.rsplit(".", 1)[-1]) or None
    return None


def _fill_embeddings(facts: CrashFacts, model: Any) -> Any:
    """Rows of the input embedding, ``config.vocab_size`` and the embedding modules' names; returns
    the input embedding module (or None)."""
    emb = _read(getattr(model, "get_input_embeddings", lambda: None), None)
    weight = getattr(emb, "weight", None)
    shape = getattr(weight, "ds_shape", None) or getattr(
        weight, "shape", None
    )  # ZeRO-3: true shape
    rows = getattr(emb, "num_embeddings", None)
    facts.num_embeddings = (
        int(rows) if isinstance(rows, int) else (int(shape[0]) if shape else None)
    )
    config = getattr(model, "config", None)
    text = _read(config.get_text_config, config) if config is not None else None
    vocab = getattr(text, "vocab_size", None)
    facts.vocab_size = int(vocab) if isinstance(vocab, int) else None
    if emb is not None:
        facts.embedding_module = _read(lambda: _module_name(model, emb), None)
    head = _read(getattr(model, "get_output_embeddings", lambda: None), None)
    if head is not None:
        facts.output_module = _read(lambda: _module_name(model, head), None)
    return emb


def _fill_parameters(facts: CrashFacts, model: Any) -> None:
    trainable = 0
    devices: set[str] = set()
    for name, param in model.named_parameters():
        dtype = _dtype(param)
        if param.is_floating_point():
            facts.param_dtypes[dtype] = facts.param_dtypes.get(dtype, 0) + 1
        devices.add(str(param.device))
        if not param.requires_grad:
            continue
        trainable += int(getattr(param, "ds_numel", 0) or param.numel())
        facts.trainable_dtypes[dtype] = facts.trainable_dtypes.get(dtype, 0) + 1
        if dtype == "float16":
            facts.trainable_fp16_count += 1
            if len(facts.trainable_fp16) < 5:
                facts.trainable_fp16.append(name)
    facts.trainable_params = trainable
    facts.devices = sorted(devices)


def _device_map(model: Any) -> list[str]:
    for module in model.modules():
        mapping = getattr(module, "hf_device_map", None)
        if isinstance(mapping, dict) and mapping:
            return sorted({_device_name(v) for v in mapping.values()})
    return []


def _device_name(value: Any) -> str:
    """An ``hf_device_map`` value as a device name: an index 0 is ``cuda:0``."""
    return f"cuda:{value}" if isinstance(value, int) else str(value)


def _reentrant(fn: Any) -> bool | None:
    """The ``use_reentrant`` a checkpoint function passes to torch: its partials' keyword, or
    torch's default (True) for ``torch.utils.checkpoint.checkpoint`` itself."""
    keywords: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    if "use_reentrant" in keywords:
        return bool(keywords["use_reentrant"])
    from torch.utils.checkpoint import checkpoint

    return True if fn is checkpoint else None


def _fill_checkpointing(facts: CrashFacts, model: Any, emb: Any) -> None:
    flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    facts.checkpointing = bool(flags)
    if flags:
        fn = getattr(flags[0], "_gradient_checkpointing_func", None)
        facts.use_reentrant = _reentrant(fn) if fn is not None else None
    if emb is None:
        return
    weight = getattr(emb, "weight", None)
    hooks = list(getattr(emb, "_forward_hooks", {}).values())
    if bool(getattr(weight, "requires_grad", False)) or any(
        getattr(h, "__name__", "") in _INPUT_GRAD_HOOKS for h in hooks
    ):
        facts.input_grads = True
    else:
        facts.input_grads = None if hooks else False  # another hook might make them require grad


def _fill_args(facts: CrashFacts, args: Any) -> None:
    if args is None:
        return
    facts.checkpointing_arg = (
        "activation_checkpointing"
        if hasattr(args, "activation_checkpointing")
        else "gradient_checkpointing"
    )
    facts.fp16 = bool(getattr(args, "fp16", False))
    facts.bf16 = bool(getattr(args, "bf16", False))
    facts.world_size = int(getattr(args, "world_size", 1) or 1)
    facts.rank = int(getattr(args, "process_index", 0) or 0)
    timeout = getattr(args, "ddp_timeout", None)
    facts.ddp_timeout = int(timeout) if isinstance(timeout, (int, float)) else None
    unused = getattr(args, "ddp_find_unused_parameters", None)
    facts.ddp_find_unused_parameters = unused if isinstance(unused, bool) else None


def _fill_quantization(facts: CrashFacts, model: Any) -> None:
    if getattr(model, "is_loaded_in_4bit", False):
        facts.quantization = "4-bit"
    elif getattr(model, "is_loaded_in_8bit", False):
        facts.quantization = "8-bit"
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return
    value = (
        config.get("bnb_4bit_compute_dtype")
        if isinstance(config, dict)
        else getattr(config, "bnb_4bit_compute_dtype", None)
    )
    if value is not None:
        facts.compute_dtype = str(value).replace("torch.", "")


def _bf16_supported(model_devices: list[str]) -> bool | None:
    """Whether the device trains in bfloat16: CPU autocast does; CUDA from compute capability 8.0.
    No CUDA function is called unless CUDA is available."""
    import torch

    if not any(d.startswith("cuda") for d in model_devices):
        return True if model_devices == ["cpu"] else None
    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


def _peer_reports(
    report: Path | None, since: float | None, rank: int | None
) -> list[dict[str, Any]]:
    """Other ranks' reports of this run (written after ``since``) beside ``report``, each with its
    ``training-died`` title."""
    if report is None or since is None:
        return []
    found = []
    for path in sorted(report.parent.glob(f"{report.stem}.rank*{report.suffix}")):
        peer = path.stem.rsplit(".rank", 1)[-1]
        if not peer.isdigit() or int(peer) == rank or path.stat().st_mtime < since:
            continue
        findings = json.loads(path.read_text(encoding="utf-8")).get("findings") or []
        died = [f for f in findings if isinstance(f, dict) and f.get("slug") == "training-died"]
        if died:
            found.append({"rank": int(peer), "file": str(path), "title": str(died[0].get("title"))})
    return found


def gather_crash_facts(
    trainer: Any = None,
    *,
    model: Any = None,
    args: Any = None,
    report: Path | None = None,
    since: float | None = None,
) -> CrashFacts:
    """Reads the facts that confirm a crash's cause; never raises.

    Args:
        trainer: the Trainer (tokenizer, data collator, model and arguments come from it).
        model: the model, when there is no Trainer (or to override its ``model``).
        args: the ``TrainingArguments``, likewise.
        report: this process's report path (other ranks' reports are looked for beside it).
        since: when this run's training began (``time.time()``): older rank reports are ignored.

    Example:
        >>> gather_crash_facts().has_tokenizer
        False
    """
    facts = CrashFacts()
    model = model if model is not None else getattr(trainer, "model", None)
    args = args if args is not None else getattr(trainer, "args", None)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("arguments", lambda: _fill_args(facts, args)),
        ("tokenizer", lambda: _fill_tokenizer(facts, _tokenizer(trainer))),
    ]
    collator = getattr(trainer, "data_collator", None)
    if collator is not None:
        facts.data_collator = getattr(collator, "__name__", None) or type(collator).__name__
    if model is not None:
        base = _read(model.get_base_model, model) if hasattr(model, "get_base_model") else model
        facts.model_class = type(base).__name__
        holder: dict[str, Any] = {}
        steps += [
            ("embeddings", lambda: holder.update(emb=_fill_embeddings(facts, model))),
            ("parameters", lambda: _fill_parameters(facts, model)),
            ("device map", lambda: setattr(facts, "device_map", _device_map(model))),
            ("checkpointing", lambda: _fill_checkpointing(facts, model, holder.get("emb"))),
            ("quantization", lambda: _fill_quantization(facts, base)),
            ("bf16", lambda: setattr(facts, "bf16_supported", _bf16_supported(facts.devices))),
        ]
    steps.append(
        (
            "rank reports",
            lambda: setattr(facts, "peer_reports", _peer_reports(report, since, facts.rank)),
        )
    )
    for what, step in steps:
        try:
            step()
        except Exception:
            logger.debug("lora-doctor: could not read the %s at the crash", what, exc_info=True)
    return facts


def record_crash(
    doctor: Doctor,
    error: BaseException,
    completed_steps: int,
    trainer: Any = None,
    *,
    model: Any = None,
    report: Path | None = None,
    since: float | None = None,
) -> bool:
    """Records ``error`` in ``doctor.facts.crash`` with the facts read now; the ``training-died``
    check classifies it at the END phase. Interrupts (``KeyboardInterrupt``, ``SystemExit``) are
    not crashes and are left alone.

    Args:
        doctor: the run's engine.
        error: the exception escaping training; the caller re-raises it unchanged.
        completed_steps: optimizer steps finished before it.
        trainer: the Trainer, when there is one.
        model: the model, when there is no Trainer (a custom loop).
        report: this process's report path (for other ranks' reports beside it).
        since: when training began (``time.time()``).

    Returns:
        True when the error was recorded.
    """
    if not isinstance(error, Exception):
        return False
    facts = gather_crash_facts(trainer, model=model, report=report, since=since)
    doctor.facts.crash = Crash.from_exception(error, completed_steps, facts)
    return True


def rank_report_path(report: Path, rank: int) -> Path:
    """Where a process other than the main one writes its own report: beside ``report``, as
    ``<stem>.rank<N><suffix>`` (``lora_doctor.rank1.json``).

    Example:
        >>> rank_report_path(Path("out/lora_doctor.json"), 1).name
        'lora_doctor.rank1.json'
    """
    return report.with_name(f"{report.stem}.rank{rank}{report.suffix}")
