"""Pieces the benchmark scripts share: the tiny Llama of their CPU checks and random token rows.

Each script puts the checkout's root on ``sys.path`` first, then imports these as
``from benchmarks._common import tiny_llama_config, Tokens``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int = 128, **overrides: object) -> LlamaConfig:
    """The Llama of the CPU checks (``--small`` / ``--dry``): 2 layers, hidden 64; ``overrides``
    set other ``LlamaConfig`` fields (initializer range, padding token, labels).

    Example:
        >>> tiny_llama_config().num_hidden_layers
        2
    """
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        **overrides,
    )


class Tokens(torch.utils.data.Dataset):
    """``n`` rows of ``seq`` random token ids below ``vocab`` (drawn from ``seed``), each its own label.

    Example:
        >>> Tokens(4, 8, 128, seed=0)[0]["input_ids"].shape
        torch.Size([8])
    """

    def __init__(self, n: int, seq: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def attention_lora_llama(dry: bool, r: int = 16) -> Any:
    """A Llama from its config with LoRA (``r``, ``lora_alpha`` 2r) on the attention projections,
    from seed 0: about 1.1B parameters in bf16 on CUDA, or :func:`tiny_llama_config`'s on CPU
    (``dry``)."""
    if dry:
        cfg = tiny_llama_config()
    else:  # about 1.1B parameters, 2.2 GB in bf16
        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=32000,
        )
    torch.manual_seed(0)
    if dry:
        base = LlamaForCausalLM(cfg)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                base = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
    lora = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    return get_peft_model(base, lora)
