"""Cost of the AdapterProbe on a 7B-shaped Llama with LoRA r 16 on all linear layers.

Measures what the probe adds to a training run: the one-time model reading at ``train_begin``
(with the fingerprint of A and B), the device memory it holds, the per-step work during the first ``check_after_steps``
steps (one fused reduction and one device sync), the comparison at the end of them, and the steady
per-step cost afterwards, each against the time of a real training step (forward, backward, AdamW).
Also checks the probe's counts against the "7B at r 16 on all linear layers is about 40M" rule.

Run on a GPU:
    python benchmarks/adapter_probe.py --out $OUT
On CPU (a small model, to check that the script works):
    python benchmarks/adapter_probe.py --device cpu --small --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_doctor.checks import Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import RunFacts
from lora_doctor.probes.base import Event
from lora_doctor.probes.model import AdapterProbe


def build(small: bool, layers: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if small:
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=1000,
        )
    else:  # Llama-2-7B's shapes
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        )
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(cfg).to(dtype)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a small model (CPU check)")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default 32, small 4)"
    )
    parser.add_argument(
        "--seq", type=int, default=None, help="tokens per step (default 512, small 64)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 10, small 3)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    a = parser.parse_args()
    device = torch.device(a.device)
    layers = a.layers or (4 if a.small else 32)
    seq = a.seq or (64 if a.small else 512)
    repeats = a.repeats or (3 if a.small else 10)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = build(a.small, layers, device, dtype)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq), device=device)

    def train_step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up (kernels, optimizer state)
    step_s = timed(train_step, device, repeats)

    config = DoctorConfig(check_after_steps=2)
    doctor = Doctor(config, RunFacts(), emit=False)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)

    def event() -> Event:
        return Event(doctor=doctor, args=None, state=state, model=model, optimizer=optimizer)

    probe = AdapterProbe()
    mem0 = allocated(device)
    sync(device)
    t0 = time.perf_counter()
    probe.train_begin(event())
    sync(device)
    begin_s = time.perf_counter() - t0
    held_bytes = allocated(device) - mem0
    facts = doctor.facts

    # Gradients as a real step leaves them, then the probe's per-step work in the first steps.
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    def first_step_hook() -> None:
        probe._grad_steps = 0  # measure the same first-steps work each repeat
        probe.pre_optimizer_step(event())

    pre_s = timed(first_step_hook, device, repeats)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.global_step = config.check_after_steps
    sync(device)
    t0 = time.perf_counter()
    probe.step_end(event())
    sync(device)
    compare_s = time.perf_counter() - t0
    freed_bytes = mem0 + held_bytes - allocated(device)

    def steady_hooks() -> None:
        state.global_step += 1
        probe.pre_optimizer_step(event())
        probe.step_end(event())

    steady_s = timed(steady_hooks, device, max(repeats, 100))
    findings = doctor.run_phase(Phase.SETUP) + doctor.run_phase(Phase.FIRST_STEPS, 2)

    med = statistics.median
    step = med(step_s)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": f"Llama {'small' if a.small else '7B-shaped'}, {layers} layers, {dtype}",
        "seq": seq,
        "lora_params": facts.lora_params,
        "base_params": facts.base_params,
        "lora_share_pct": 100 * facts.lora_params / facts.base_params,
        "lora_layers": len(facts.layers),
        "train_step_s": step,
        "train_begin_s": begin_s,
        "held_bytes": held_bytes,
        "held_freed_bytes": freed_bytes,
        "first_steps_hook_s": med(pre_s),
        "first_steps_hook_pct_of_step": 100 * med(pre_s) / step,
        "compare_s": compare_s,
        "steady_hooks_s": med(steady_s),
        "steady_hooks_pct_of_step": 100 * med(steady_s) / step,
        "no_grad_layers": len(facts.no_grad_layers),
        "b_still_zero_layers": len(facts.b_still_zero_layers),
        "frozen_in_place": len(facts.frozen_in_place),
        "findings": sorted({f.slug for f in findings}),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "adapter_probe.json").write_text(json.dumps(result, indent=2))

    print(f"\nAdapterProbe cost: {result['model']}, seq {seq}, on {result['device']}")
    rows = [
        (
            "LoRA params (r16 all-linear)",
            f"{facts.lora_params:,} ({result['lora_share_pct']:.2f}% of {facts.base_params:,})",
        ),
        ("LoRA layers", str(len(facts.layers))),
        ("train step (fwd+bwd+AdamW)", f"{step * 1e3:.1f} ms"),
        ("train_begin (read + fingerprint)", f"{begin_s * 1e3:.1f} ms"),
        (
            "device memory held after begin",
            f"{held_bytes / 2**20:.2f} MiB (freed {freed_bytes / 2**20:.2f} MiB)",
        ),
        (
            "first-steps hook / step",
            f"{med(pre_s) * 1e3:.2f} ms ({result['first_steps_hook_pct_of_step']:.2f}% of a step)",
        ),
        ("compare at step 2 (once)", f"{compare_s * 1e3:.1f} ms"),
        (
            "steady hooks / step",
            f"{med(steady_s) * 1e6:.1f} us ({result['steady_hooks_pct_of_step']:.4f}% of a step)",
        ),
        (
            "not learning (expect 0)",
            f"{result['no_grad_layers']} no grad, {result['b_still_zero_layers']} B zero, {result['frozen_in_place']} frozen",
        ),
        ("findings", ", ".join(result["findings"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
