"""Tiny models, data and Trainer arguments shared by the tests (built from configs, no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(cfg)


def tiny_peft(
    r: int = 4,
    lora_alpha: float = 8,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Any:
    return get_peft_model(
        tiny_llama(seed),
        LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules)),
    )


class Rows(torch.utils.data.Dataset):
    """Random token rows, each its own label."""

    def __init__(self, n: int = 16, seq: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_args(out: Path, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer built in memory (no hub download), ids below VOCAB."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + " .,?!")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


def shared_case(name: str) -> Path:
    """The folder of a case rebuilt from a real report (``shared/cases/<name>``, found above the
    checkout, as ``../shared`` from the main one); skips the test when the cases are not there."""
    import pytest

    for parent in Path(__file__).resolve().parents:
        folder = parent / "shared" / "cases" / name
        if folder.is_dir():
            return folder
    pytest.skip(f"shared case {name!r} not found above {Path(__file__).parent}")


def run_case_repro(case: str, tmp_path: Path, **env: str) -> dict[str, Any]:
    """Runs a shared case's ``repro.py`` from a copy in ``tmp_path`` (it writes ``out/`` beside
    itself) with this checkout's lora_doctor, and returns the ``lora_doctor.json`` it wrote."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "repro.py"
    shutil.copy(shared_case(case) / "repro.py", script)
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(script)],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root), **env},
        capture_output=True,
        timeout=300,
    )
    report: dict[str, Any] = json.loads((tmp_path / "out" / "lora_doctor.json").read_text("utf-8"))
    return report


def torchrun(worker: str, out: Path) -> tuple[int, str]:
    """Runs ``tests/<worker>`` on 2 CPU processes (gloo) under torchrun on a free port, with
    ``--out out``; returns its exit status and its output (stdout then stderr)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), str(root / "tests" / worker), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def probe_steps(model: Any, optimizer: Any, steps: int, loss_scale: float = 1.0) -> Any:
    """The adapter probe around ``steps`` steps of a plain loop on a fixed batch (its loss times
    ``loss_scale``; no backward when the loss needs no gradient); returns the ``Doctor`` whose
    facts the probe filled (``check_after_steps=steps``)."""
    from lora_doctor.config import DoctorConfig
    from lora_doctor.engine import Doctor
    from lora_doctor.facts import RunFacts
    from lora_doctor.probes.base import Event
    from lora_doctor.probes.model import AdapterProbe

    doctor = Doctor(DoctorConfig(check_after_steps=steps), RunFacts(), emit=False)
    state = type("State", (), {"global_step": 0})()
    probe = AdapterProbe()

    def event() -> Event:
        return Event(doctor=doctor, args=None, state=state, model=model, optimizer=optimizer)

    probe.train_begin(event())
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss * loss_scale
        if loss.requires_grad:
            loss.backward()
        probe.pre_optimizer_step(event())
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        probe.step_end(event())
    return doctor
