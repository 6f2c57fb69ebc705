"""The training set-up read at train begin: what the causes are judged against."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from lora_doctor.facts import RunFacts, SetupFacts, derive_facts
from lora_doctor.offline import diagnose
from lora_doctor.probes.setup import checkpoint_steps, read_setup
from lora_doctor.probes.view import ModelView


def test_llama_setup_from_arguments(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-40").mkdir()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=100,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        max_grad_norm=0.5,
        save_strategy="steps",
        save_steps=20,
        logging_steps=5,
        metric_for_best_model="eval_loss",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=True,
        report_to=[],
    )
    setup = read_setup(SetupFacts(), ModelView.build(model), args, max_steps=100)
    assert setup.optimizer == "adamw_torch_fused" or setup.optimizer.startswith("adamw")
    assert (setup.lr_scheduler_type, setup.warmup_steps, setup.max_grad_norm) == ("cosine", 10, 0.5)
    assert (setup.save_strategy, setup.save_steps, setup.checkpoint_steps) == (
        "steps",
        20,
        [20, 40],
    )
    assert setup.metric_for_best_model == "eval_loss" and setup.logging_steps == 5
    assert setup.gradient_checkpointing is True and setup.use_reentrant is False
    assert setup.vocab_size == model.get_input_embeddings().num_embeddings
    assert setup.hidden_size == model.config.hidden_size
    assert setup.module_kinds[:2] == ["q_proj", "k_proj"] and "down_proj" in setup.module_kinds
    assert setup.trainable_dtypes == ["float32"]
    facts = derive_facts(RunFacts(setup=setup), [])
    assert facts.setup.precision == "fp32"
    assert facts.setup.loss_at_chance == pytest.approx(math.log(setup.vocab_size))


@pytest.mark.parametrize(
    ("on_model", "in_args", "expected"),
    [(True, False, True), (False, True, True), (False, False, False)],
    ids=["model-only", "arguments-only", "neither"],
)
def test_checkpointing_on_when_the_model_or_the_arguments_say_so(
    on_model: bool, in_args: bool, expected: bool
) -> None:
    """A model checkpointed by hand (model.gradient_checkpointing_enable) with the Trainer's
    gradient_checkpointing=False still checkpoints: the causes must see it."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if on_model:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    args = SimpleNamespace(gradient_checkpointing=in_args)
    setup = read_setup(SetupFacts(), ModelView.build(model), args, max_steps=10)
    assert setup.gradient_checkpointing is expected


@pytest.mark.parametrize(
    ("args", "steps"),
    [
        ({"warmup_steps": 30}, 30),
        ({"warmup_steps": 0.1}, 20),
        ({"warmup_steps": 0, "warmup_ratio": 0.05}, 10),
        ({}, 0),
    ],
    ids=["steps", "ratio-in-warmup-steps", "warmup-ratio", "none"],
)
def test_warmup_steps(args: dict, steps: int) -> None:
    assert (
        read_setup(SetupFacts(), None, SimpleNamespace(**args), max_steps=200).warmup_steps == steps
    )


def test_gpt2_module_names_and_optimizer_class() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    setup = read_setup(SetupFacts(), ModelView.build(model, optimizer), None, optimizer)
    assert setup.module_kinds == ["c_attn", "c_proj", "c_fc"]
    assert setup.optimizer == "SGD" and setup.vocab_size == 50
    assert setup.hidden_size == 32  # n_embd


def test_hidden_size_of_a_multimodal_model_is_its_text_models() -> None:
    """A vision-language model's learning rates follow its language model's width."""
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2)
    model = torch.nn.Linear(2, 2)
    model.config = LlavaConfig(text_config=text.to_dict())  # type: ignore[assignment]
    setup = read_setup(SetupFacts(), ModelView.build(model), None)
    assert setup.hidden_size == 48


@pytest.mark.parametrize(
    ("setup", "precision"),
    [
        (SetupFacts(bf16=True, trainable_dtypes=["float32"]), "bf16"),
        (SetupFacts(fp16=True), "fp16"),
        (SetupFacts(trainable_dtypes=["bfloat16"]), "bf16"),
        (SetupFacts(trainable_dtypes=["float32", "bfloat16"]), None),
        (SetupFacts(), None),
    ],
    ids=["bf16-flag", "fp16-flag", "bf16-weights", "mixed-weights", "unknown"],
)
def test_precision_in_use(setup: SetupFacts, precision: str | None) -> None:
    assert derive_facts(RunFacts(setup=setup), []).setup.precision == precision


def test_offline_reads_logging_and_checkpoints(tmp_path: Path) -> None:
    for step in (50, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    state = tmp_path / "trainer_state.json"
    state.write_text(
        '{"logging_steps": 10, "save_steps": 50, "log_history": [{"step": 10, "loss": 1.0}]}'
    )
    setup = diagnose(tmp_path).run["setup"]
    assert (setup["logging_steps"], setup["save_steps"]) == (10, 50)
    assert setup["checkpoint_steps"] == [50, 100]
    assert checkpoint_steps(tmp_path) == [50, 100]
