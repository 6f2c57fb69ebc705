"""Tiny models and made-up data for the fault benchmark.

The base models are built from configs with random weights (no downloads). Their weights are drawn
with ``initializer_range=0.1`` rather than the usual 0.02: with the frozen random head of a 0.02
model, logits cannot leave a narrow band around zero and no adapter can lower the loss much, so a
healthy run would look like a plateau. At 0.1 a LoRA adapter on a healthy setup takes the loss from
about 4.8 to about 1.2 within 100 steps, as a real fine-tuning run falls.

The language model task is a noisy chain: sequences over a fixed 16-token slice of the vocabulary
(or the whole vocabulary, for the runs that start from :func:`vocabulary_model`) in which each
token is followed by a fixed successor with probability ``1 - noise`` and by a random token
otherwise. It has structure to learn (the successor table) and noise to memorise (overfit).
The classification task labels a sequence by whether its last token lies in the lower half of the
vocabulary (the classifier reads the last position, so even a frozen body lets the head learn).

A pre-trained base (:func:`pretrained_model`) is the tiny model trained fully on the chain
language for a few seconds, so that, like a real base model, it already knows something; its
fine-tuning task is a dialect (``chain_data(..., dialect=True)``) in which 8 of the 16 tokens have
new successors. A LoRA run on it starts far below chance (about 2.6 against ln 128 = 4.85) and
has something new to learn.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
)

from benchmarks._common import tiny_llama_config

__all__ = [
    "ARCHS",
    "VOCAB",
    "chain_data",
    "char_tokenizer",
    "class_data",
    "lora_targets",
    "pretrained_model",
    "random_data",
    "tiny_model",
]

ARCHS = ("llama", "gpt2")
VOCAB = 128
SEQ_LEN = 32
INIT_RANGE = 0.1
_CHAIN_TOKENS = 16
_TASK_SEED = 1234  # the chain's successor table: the same "language" for every run and seed

Example = dict[str, torch.Tensor]


def tiny_model(arch: str, seed: int, *, head: str = "lm") -> PreTrainedModel:
    """A two-layer model of ``arch`` with random weights drawn from ``seed``.

    Args:
        arch: ``"llama"`` or ``"gpt2"`` (GPT-2's Conv1D layers keep the fan_in_fan_out path honest).
        seed: seeds the weights.
        head: ``"lm"`` for a causal language model, ``"cls"`` for a two-class sequence classifier.

    Example:
        >>> tiny_model("llama", 0).config.hidden_size
        64
    """
    torch.manual_seed(seed)
    if arch == "llama":
        config: Any = tiny_llama_config(
            VOCAB, initializer_range=INIT_RANGE, pad_token_id=0, num_labels=2
        )
        cls: Any = LlamaForCausalLM if head == "lm" else LlamaForSequenceClassification
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=2 * SEQ_LEN,
            initializer_range=INIT_RANGE,
            pad_token_id=0,
            num_labels=2,
        )
        cls = GPT2LMHeadModel if head == "lm" else GPT2ForSequenceClassification
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return cls(config)


def lora_targets(arch: str, *, attention_only: bool = False) -> list[str]:
    """LoRA target modules: every linear layer, or the attention projections only.

    Example:
        >>> lora_targets("gpt2", attention_only=True)
        ['c_attn']
    """
    if arch == "llama":
        attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
        return (
            attn[:1] + attn[2:3] if attention_only else [*attn, "gate_proj", "up_proj", "down_proj"]
        )
    if arch == "gpt2":
        return ["c_attn"] if attention_only else ["c_attn", "c_proj", "c_fc"]
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _lm_example(tokens: torch.Tensor) -> Example:
    return {
        "input_ids": tokens,
        "labels": tokens.clone(),
        "attention_mask": torch.ones_like(tokens),
    }


def chain_data(
    n: int, seed: int, *, noise: float = 0.1, tokens: int = _CHAIN_TOKENS, dialect: bool = False
) -> list[Example]:
    """``n`` sequences of the noisy chain language (see the module docstring), over an alphabet of
    ``tokens`` tokens (``VOCAB - 1``: every token but padding, so that a model that learned nothing
    but the token frequencies sits at ln(VOCAB)); with ``dialect``, of its dialect, in which 8 of
    the tokens have new successors.

    Example:
        >>> chain_data(2, 0)[0]["input_ids"].shape
        torch.Size([32])
    """
    g = torch.Generator().manual_seed(_TASK_SEED)
    alphabet = torch.randperm(VOCAB - 1, generator=g)[:tokens] + 1  # token 0 is padding
    successor = torch.randperm(tokens, generator=g)
    if dialect:
        successor[:_DIALECT] = successor[:_DIALECT].roll(1)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.empty(SEQ_LEN, dtype=torch.long)
        idx[0] = torch.randint(tokens, (1,), generator=g)
        jumps = torch.rand(SEQ_LEN, generator=g) < noise
        random_next = torch.randint(tokens, (SEQ_LEN,), generator=g)
        for t in range(1, SEQ_LEN):
            idx[t] = random_next[t] if jumps[t] else successor[idx[t - 1]]
        out.append(_lm_example(alphabet[idx]))
    return out


_DIALECT = 8  # tokens whose successor the dialect changes
_PRETRAIN_STEPS, _PRETRAIN_BATCH, _PRETRAIN_LR = 150, 16, 3e-3


def pretrained_model(arch: str, seed: int) -> PreTrainedModel:
    """:func:`tiny_model` trained fully on the chain language (150 steps of 16 sequences at
    learning rate 3e-3 with AdamW, a few seconds on a CPU): a base model that knows something.

    Example:
        >>> base = pretrained_model("gpt2", 0)  # doctest: +SKIP
    """
    model = tiny_model(arch, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_PRETRAIN_LR)
    data = chain_data(_PRETRAIN_STEPS * _PRETRAIN_BATCH, seed + 20_000)
    for start in range(0, len(data), _PRETRAIN_BATCH):
        ids = torch.stack([e["input_ids"] for e in data[start : start + _PRETRAIN_BATCH]])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


#: The base of :func:`vocabulary_model`: full fine-tuning steps, batch, rate and noise on the
#: full-vocabulary chain seen with half its successors random.
_VOCAB_STEPS, _VOCAB_BATCH, _VOCAB_LR, _VOCAB_NOISE = 100, 16, 1e-2, 0.5


def vocabulary_model(arch: str, seed: int) -> PreTrainedModel:
    """A two-layer model of ``arch`` that already knows the language over the whole vocabulary,
    as a real base model does.

    :func:`tiny_model` is trained (every weight, AdamW at 1e-2, 100 steps of 16 sequences) on the
    chain over the whole vocabulary with half of its successors random: it learns each token's
    successor with a probability of about one half. Fine-tuning it on the clean chain
    (``chain_data(n, seed, tokens=VOCAB - 1)``) starts at about 0.25 ln(VOCAB) with room to fall,
    as a pretrained model starts far below chance on its fine-tuning data; a model destroyed by
    its updates sits at ln(VOCAB), the uniform guess over the chain's tokens. Takes about 5 s on
    one CPU thread.

    Example:
        >>> vocabulary_model("llama", 0).training  # doctest: +SKIP
        True
    """
    model = tiny_model(arch, seed)
    data = chain_data(512, seed + 20_000, noise=_VOCAB_NOISE, tokens=VOCAB - 1)
    ids = torch.stack([example["input_ids"] for example in data])
    optimizer = torch.optim.AdamW(model.parameters(), lr=_VOCAB_LR)
    g = torch.Generator().manual_seed(seed)
    for _ in range(_VOCAB_STEPS):
        batch = ids[torch.randint(len(ids), (_VOCAB_BATCH,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def random_data(n: int, seed: int) -> list[Example]:
    """``n`` sequences of uniformly random tokens: nothing to learn, everything to memorise."""
    g = torch.Generator().manual_seed(seed)
    return [_lm_example(torch.randint(1, VOCAB, (SEQ_LEN,), generator=g)) for _ in range(n)]


def class_data(n: int, seed: int) -> list[Example]:
    """``n`` random sequences labelled 1 when the last token is in the lower half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(1, VOCAB, (SEQ_LEN,), generator=g)
        out.append(
            {
                "input_ids": tokens,
                "labels": torch.tensor(int(tokens[-1] < VOCAB // 2)),
                "attention_mask": torch.ones_like(tokens),
            }
        )
    return out


def char_tokenizer() -> Any:
    """A character-level fast tokenizer built in memory (no download), ids below ``VOCAB``: 0 pads,
    1 ends a sequence, 2 begins one, 3 is unknown (the tiny models' ``pad_token_id`` is 0).

    Example:
        >>> char_tokenizer()("ab<")["input_ids"]
        [4, 5, 45]
    """
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        *(string.ascii_lowercase + string.digits + " .,?!<>/"),
    ]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(symbols)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
