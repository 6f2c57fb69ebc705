"""lora-doctor quickstart: LoRA with a deliberate mistake on a tiny model, and the doctor's diagnosis.

Runs on a CPU in well under a minute, with no download. A tiny Llama is built from a config and
pre-trained for a few seconds on a made-up "chain language" (16 tokens, each followed by a fixed
successor nine times in ten), so that, like a real base model, it already knows something. The
fine-tuning task is a dialect of that language in which 8 of the 16 tokens have new successors:
the LoRA adapter has to learn them.

The mistake: ``lora_alpha=1`` (the default of loralib, LoRA's first implementation) with ``r=16``.
peft scales the update by lora_alpha / r = 1/16, sixteen to thirty-two times less than the usual
lora_alpha = r or 2r, so the adapter barely moves and the loss stays flat near where it started.
The doctor warns before the first step (``alpha-rank-ratio``), then reports that the loss never
fell (``loss-at-chance``) with that scaling as its most likely cause and the fix,
``lora_alpha=32``, in ``config_changes``. The script then closes the loop: it applies the
diagnosis to its own ``LoraConfig`` and ``TrainingArguments`` (``Diagnosis.apply``), trains again
from step 0 on the same base, and prints both final losses (about 2.6 with the mistake, about 1.1
with the fix).

Usage:
    python examples/quickstart.py [--output-dir out/quickstart] [--seed 0] [--set FIELD=VALUE ...]
        [--no-fix]

``--set`` changes a field of ``LoraConfig`` or ``TrainingArguments`` (a finding's
``config_changes``, applied by hand); the value is read as JSON when it parses, else as a string.
``--no-fix`` trains once, without the loop.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_doctor import Diagnosis, LoraDoctorCallback

VOCAB, SEQ_LEN, ALPHABET = 128, 32, 16


def chain_language(dialect: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The language's 16 tokens and each one's successor (the same for every run); the dialect
    gives 8 of them new successors."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randperm(VOCAB - 1, generator=g)[:ALPHABET] + 1
    successor = torch.randperm(ALPHABET, generator=g)
    if dialect:
        successor[:8] = successor[:8].roll(1)
    return tokens, successor


def sentences(n: int, seed: int, dialect: bool, noise: float = 0.1) -> torch.Tensor:
    """``n`` sequences: each token is followed by its successor, or by a random token one time in
    ten (noise the model cannot learn)."""
    tokens, successor = chain_language(dialect)
    g = torch.Generator().manual_seed(seed)
    idx = torch.empty(n, SEQ_LEN, dtype=torch.long)
    idx[:, 0] = torch.randint(ALPHABET, (n,), generator=g)
    jumps = torch.rand(n, SEQ_LEN, generator=g) < noise
    random_next = torch.randint(ALPHABET, (n, SEQ_LEN), generator=g)
    for t in range(1, SEQ_LEN):
        idx[:, t] = torch.where(jumps[:, t], random_next[:, t], successor[idx[:, t - 1]])
    return tokens[idx]


class Sentences(Dataset):
    """Sequences of the chain language for the Trainer (each its own label)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def base_model(seed: int, steps: int = 150) -> LlamaForCausalLM:
    """A tiny Llama pre-trained on the chain language (full training, a few seconds on a CPU)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ_LEN,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = sentences(16 * steps, seed + 100, dialect=False)
    for batch in data.split(16):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _changes(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs as a dict, each value read as JSON when it parses."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE, got {pair!r}")
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError:
            out[name] = text
    return out


def _split(changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The changes for LoraConfig and for TrainingArguments, by their field names."""
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    args_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(changes) - lora_fields - args_fields)
    if unknown:
        raise SystemExit(f"--set: {unknown} are fields of neither LoraConfig nor TrainingArguments")
    lora = {k: v for k, v in changes.items() if k in lora_fields}
    return lora, {k: v for k, v in changes.items() if k not in lora}


def train(
    base: LlamaForCausalLM, lora: LoraConfig, training_args: TrainingArguments, seed: int
) -> tuple[float, float, Diagnosis]:
    """Fine-tunes a copy of ``base`` with ``lora`` from step 0, with the doctor; returns the first
    and last logged training loss and the diagnosis it wrote."""
    torch.manual_seed(seed)  # the same adapter initialisation in every run
    model = get_peft_model(copy.deepcopy(base), lora)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Sentences(sentences(1024, seed, dialect=True)),
        callbacks=[LoraDoctorCallback()],
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    report = Path(training_args.output_dir) / "lora_doctor.json"
    return losses[0], losses[-1], Diagnosis.from_dict(json.loads(report.read_text()))


def show(diagnosis: Diagnosis, output_dir: str) -> None:
    """Each finding of the diagnosis with its fix and, for a configuration change, its ``--set``."""
    print(
        f"The diagnosis is in {output_dir}/lora_doctor.json: {len(diagnosis.findings)} finding(s)"
    )
    for f in diagnosis.findings:
        print(f"  {f.severity.value:7} {f.code} {f.slug}: {f.title}")
        rec = f.recommendation
        if rec:
            changes = " ".join(f"{k}={json.dumps(v)}" for k, v in rec.config_changes.items())
            print(f"          fix: {rec.summary}" + (f"  (--set {changes})" if changes else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--output-dir", default="out/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument(
        "--no-fix", action="store_true", help="train once; do not apply the diagnosis and retrain"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    lora_changes, args_changes = _split(_changes(args.set))

    base = base_model(args.seed)
    lora = LoraConfig(
        r=16,
        lora_alpha=1,  # the mistake: lora_alpha / r = 1/16; the usual is lora_alpha = r or 2r
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    lora = dataclasses.replace(lora, **lora_changes)
    training_args = TrainingArguments(
        **{
            "output_dir": args.output_dir,
            "max_steps": 80,
            "per_device_train_batch_size": 16,
            "learning_rate": 5e-4,
            "logging_steps": 5,
            "save_strategy": "no",
            "report_to": [],
            "use_cpu": True,
            "disable_tqdm": True,
            "seed": args.seed,
            **args_changes,
        }
    )
    first, last, diagnosis = train(base, lora, training_args, args.seed)
    print(f"\nFinal training loss: {last:.3f} (first logged: {first:.3f})")
    show(diagnosis, args.output_dir)
    if args.no_fix:
        return

    # the loop: the doctor's config_changes applied to this run's own objects, then from scratch
    fix = diagnosis.apply(lora, training_args)
    if not fix.applied:
        print("\nNothing to apply: the diagnosis holds no configuration change.")
        return
    print("\nApplying the diagnosis:\n" + fix.summary())
    fixed_dir = str(Path(args.output_dir) / "fixed")
    fixed_args = dataclasses.replace(fix.training_args, output_dir=fixed_dir)
    _, fixed_last, fixed = train(base, fix.lora_config, fixed_args, args.seed)
    print(f"\nFinal training loss: {last:.3f} with the mistake, {fixed_last:.3f} with the fix")
    show(fixed, fixed_dir)


if __name__ == "__main__":
    main()
