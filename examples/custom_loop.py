"""lora-doctor in a plain PyTorch training loop (no Trainer): a tiny LoRA model with a mistake.

Runs on a CPU in seconds, with no download: a two-layer Llama built from a config, LoRA on every
linear layer, and made-up data with something to learn (each token is usually followed by a fixed
successor).

The mistake: a learning rate of 2e-5, a full fine-tuning rate. LoRA trains a few small matrices
and wants about ten times more (this tiny task learns at 2e-3). The loss stays near ln(64), the
loss of a uniform guess over the vocabulary; the doctor reports that it sits at chance and names
the learning rate as its most likely cause, with the fix, and writes
``out/custom_loop/lora_doctor.json``. With ``--only-lora-a`` the optimizer gets only the
``lora_A`` matrices (a parameter-name filter gone wrong): the set-up checks report the ``lora_B``
matrices missing from the optimizer, and the first-steps checks that B is still zero after two
steps.

The loop drives a :class:`lora_doctor.LoopDoctor`, with hooks named after Lightning's: ``with
doctor:`` reads the model and runs the set-up checks, then the end checks and writes the JSON (or
records the error if the loop dies); ``on_before_optimizer_step`` lets the first-steps checks see
the gradients; ``on_train_batch_end`` hands over the metrics of the steps that log (and runs the
curve checks).

Usage:
    python examples/custom_loop.py [--output-dir out/custom_loop] [--lr 2e-5] [--steps 200]
        [--only-lora-a]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lora_doctor

VOCAB, LENGTH, BATCH = 64, 32, 16


def chain_batch(g: torch.Generator, successor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of sequences in which each token is followed by ``successor[token]`` nine times
    in ten, and by a random token otherwise."""
    ids = torch.empty(BATCH, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(VOCAB, (BATCH,), generator=g)
    for t in range(1, LENGTH):
        jump = torch.rand(BATCH, generator=g) < 0.1
        ids[:, t] = torch.where(
            jump, torch.randint(VOCAB, (BATCH,), generator=g), successor[ids[:, t - 1]]
        )
    return {"input_ids": ids, "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/custom_loop")
    parser.add_argument("--lr", type=float, default=2e-5, help="the mistake; 2e-3 trains well")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--only-lora-a", action="store_true", help="a second mistake: lora_B not in the optimizer"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        initializer_range=0.1,  # a random base that an adapter can steer (0.02 stays near uniform)
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM(config), lora)
    params = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and (not args.only_lora_a or "lora_A" in name)
    ]
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    report = Path(args.output_dir) / "lora_doctor.json"
    doctor = lora_doctor.LoopDoctor(model, optimizer, max_steps=args.steps, report_path=report)
    g = torch.Generator().manual_seed(0)
    successor = torch.randperm(VOCAB, generator=g)
    with doctor:  # the set-up checks; at the end, the last checks and the JSON
        for step in range(1, args.steps + 1):
            loss = model(**chain_batch(g, successor)).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            doctor.on_before_optimizer_step()  # the first steps' checks read the gradients
            optimizer.step()
            optimizer.zero_grad()
            logs = {"loss": loss.item(), "grad_norm": grad_norm.item()} if step % 5 == 0 else None
            doctor.on_train_batch_end(logs)  # the curve checks, at the steps that log
    diagnosis = doctor.diagnosis
    assert diagnosis is not None

    print(f"\nThe diagnosis is in {report}: {len(diagnosis.findings)} finding(s)")
    for f in diagnosis.findings:
        fix = f.recommendation.summary if f.recommendation else "-"
        print(f"  {f.severity.value:7} {f.code} {f.slug}: {f.title}\n          fix: {fix}")


if __name__ == "__main__":
    main()
