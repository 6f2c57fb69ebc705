"""Facts from the ecosystem around the model: the vLLM engine that generates for RL trainers.

Read by duck typing, so that neither vLLM nor Unsloth need be importable: Unsloth's
``FastLanguageModel.from_pretrained(fast_inference=True, max_lora_rank=...)`` keeps its vLLM ``LLM``
as ``model.vllm_engine``; a vLLM ``LLM`` keeps its ``LoRAConfig`` (with ``max_lora_rank``) in
``llm_engine.vllm_config.lora_config`` (older releases: ``llm_engine.lora_config``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["vllm_max_lora_rank"]

#: Attribute paths from a vLLM ``LLM`` (or its engine) to its ``LoRAConfig``.
_LORA_CONFIG_PATHS = (
    ("llm_engine", "vllm_config", "lora_config"),
    ("llm_engine", "lora_config"),
    ("vllm_config", "lora_config"),
    ("lora_config",),
)
#: Attributes of training arguments that name vLLM's LoRA rank limit.
_ARG_NAMES = ("vllm_max_lora_rank", "max_lora_rank")


def _rank(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _follow(obj: Any, path: tuple[str, ...]) -> Any:
    for attr in path:
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def _engine_rank(engine: Any) -> int | None:
    for path in _LORA_CONFIG_PATHS:
        rank = _rank(getattr(_follow(engine, path), "max_lora_rank", None))
        if rank is not None:
            return rank
    return None


def vllm_max_lora_rank(args: Any, model: Any) -> int | None:
    """The ``max_lora_rank`` of the vLLM engine the run generates with, when it can be read.

    Looks at the training arguments (``vllm_max_lora_rank`` / ``max_lora_rank``, unless
    ``use_vllm`` is False), then at a vLLM engine the model carries (Unsloth's ``vllm_engine``).

    Example:
        >>> class Args: use_vllm, vllm_max_lora_rank = True, 16
        >>> vllm_max_lora_rank(Args(), None)
        16
    """
    if getattr(args, "use_vllm", True) is not False:
        for name in _ARG_NAMES:
            rank = _rank(getattr(args, name, None))
            if rank is not None:
                return rank
    if model is None:
        return None
    for holder in (model, getattr(model, "module", None)):
        if holder is None:
            continue
        try:
            engine = getattr(holder, "vllm_engine", None)
        except Exception:  # a model's __getattr__ may raise anything
            engine = None
        rank = _engine_rank(engine) if engine is not None else None
        if rank is not None:
            return rank
    return None
