"""AdapterProbe and the adapter checks on live PEFT models built from tiny configs."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny import VOCAB, probe_steps, tiny_llama
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from lora_doctor.checks import Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import RunFacts
from lora_doctor.integrations.hf import LoraDoctorCallback
from lora_doctor.probes.base import Event
from lora_doctor.probes.model import AdapterProbe, read_facts
from lora_doctor.report import load_schema


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=VOCAB,
            num_labels=3,
        )
    )


def facts_of(model: nn.Module, optimizer: Any = None) -> RunFacts:
    facts = RunFacts()
    read_facts(model, facts, optimizer)
    return facts


def setup_slugs(facts: RunFacts) -> set[str]:
    return {f.slug for f in Doctor(DoctorConfig(), facts, emit=False).run_phase(Phase.SETUP)}


def lm_data(n: int = 8) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(1)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def cls_data(n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, 12), generator=g).tolist()
    return Dataset.from_dict(
        {"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=g).tolist()}
    )


def train(
    model: nn.Module,
    tmp_path: Path,
    data: Dataset | None = None,
    steps: int = 3,
    optimizers: tuple[Any, Any] = (None, None),
    check_after_steps: int = 2,
    **args: Any,
) -> LoraDoctorCallback:
    callback = LoraDoctorCallback(check_after_steps=check_after_steps)
    targs = TrainingArguments(
        str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=args.pop("learning_rate", 1e-2),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
        **args,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data if data is not None else lm_data(),
        callbacks=[callback],
        optimizers=optimizers,
    )
    trainer.train()
    return callback


def found(callback: LoraDoctorCallback) -> set[str]:
    assert callback.doctor is not None
    return {f.slug for f in callback.doctor.findings}


# --- reading the model ------------------------------------------------------------------------------
def test_llama_layers_and_counts() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    facts = facts_of(model)
    trainable, total = model.get_nb_trainable_parameters()
    assert facts.has_lora is True
    assert facts.lora_params == facts.trainable_lora_params == trainable
    assert facts.lora_params_by_adapter == {"default": trainable}
    assert facts.base_params == total - trainable
    assert facts.trainable_base == []
    q = next(lf for lf in facts.layers if lf.name == "model.layers.0.self_attn.q_proj")
    assert (q.r, q.lora_alpha, q.scaling, q.d_in, q.d_out) == (8, 16.0, 2.0, 64, 64)
    assert (q.a_shape, q.b_shape, q.base_numel) == ((8, 64), (64, 8), 64 * 64)
    assert len(facts.layers) == 4
    assert facts.adapters["default"].target_modules == ["q_proj", "v_proj"]


def test_gpt2_conv1d_fan_in_fan_out_shapes() -> None:
    model = get_peft_model(
        tiny_gpt2(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    facts = facts_of(model)
    c_attn = next(lf for lf in facts.layers if lf.name == "transformer.h.0.attn.c_attn")
    assert (c_attn.kind, c_attn.fan_in_fan_out, c_attn.d_in, c_attn.d_out) == (
        "conv1d",
        True,
        64,
        192,
    )
    assert (c_attn.a_shape, c_attn.b_shape) == ((4, 64), (192, 4))
    mlp = next(lf for lf in facts.layers if lf.name == "transformer.h.0.mlp.c_proj")
    assert (mlp.d_in, mlp.d_out) == (256, 64)
    doctor = Doctor(DoctorConfig(), facts, emit=False)
    assert "adapter-shape" not in {f.slug for f in doctor.run_phase(Phase.FIRST_STEPS, 2)}


def test_gpt2_attention_only_recognised_by_path() -> None:
    model = get_peft_model(
        tiny_gpt2(),
        LoraConfig(r=4, lora_alpha=8, target_modules=r".*attn\.c_(attn|proj)", fan_in_fan_out=True),
    )
    assert "attention-only-targets" in setup_slugs(facts_of(model))


def test_bert_modules_to_save_patterns_and_rslora() -> None:
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        rank_pattern={"layer.0.attention.self.query": 4},
        alpha_pattern={"value": 4},
        use_rslora=True,
    )
    model = get_peft_model(tiny_bert(), config)
    facts = facts_of(model)
    trainable, total = model.get_nb_trainable_parameters()
    head = 64 * 3 + 3  # the classifier, copied by modules_to_save
    assert facts.lora_params == trainable - head
    assert facts.base_params == total - trainable  # the copy is not base; the original is
    assert facts.trainable_base == []
    by_name = {lf.name: lf for lf in facts.layers}
    q0 = by_name["bert.encoder.layer.0.attention.self.query"]
    v1 = by_name["bert.encoder.layer.1.attention.self.value"]
    assert (q0.r, q0.lora_alpha, q0.a_shape, q0.use_rslora) == (4, 16.0, (4, 64), True)
    assert q0.scaling == pytest.approx(16 / 2)
    assert (v1.r, v1.lora_alpha, v1.scaling) == (8, 4.0, pytest.approx(4 / 8**0.5))
    doctor = Doctor(DoctorConfig(), facts, emit=False)
    (alpha,) = [f for f in doctor.run_phase(Phase.SETUP) if f.slug == "alpha-rank-ratio"]
    # q0 (scaling 8) and the other query layer (16/sqrt(8) = 5.7) are off; the values (1.41) fit.
    assert sorted(alpha.evidence["odd_layers"]) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
    ]
    assert "attention-only-targets" in {f.slug for f in doctor.findings}


def test_dora_magnitude_counted_and_not_a_shape_alarm() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], use_dora=True)
    )
    facts = facts_of(model)
    assert all(lf.use_dora for lf in facts.layers)
    assert facts.lora_params == 2 * (8 * 64 + 64 * 8 + 64)  # A, B and the magnitude vector
    doctor = Doctor(DoctorConfig(), facts, emit=False)
    assert "adapter-shape" not in {f.slug for f in doctor.run_phase(Phase.FIRST_STEPS, 2)}


def test_two_adapters_counted_apart_and_active_flagged() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["down_proj"]))
    facts = facts_of(model)
    assert facts.lora_params_by_adapter == {
        "default": 2 * (8 * (64 + 64) + 8 * (64 + 32)),  # q 64->64, v 64->32 (2 kv heads)
        "other": 2 * 2 * (128 + 64),
    }
    assert {lf.adapter: lf.active for lf in facts.layers} == {"default": True, "other": False}
    assert set(facts.adapters) == {"default", "other"}


def test_model_without_lora() -> None:
    facts = facts_of(tiny_llama())
    assert facts.has_lora is False
    assert facts.lora_params == 0 and facts.layers == []
    findings = Doctor(DoctorConfig(), facts, emit=False).run_phase(Phase.SETUP)
    assert [f.slug for f in findings] == ["no-lora-adapter"]


def test_fake_zero3_params_read_at_true_size() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    expected = facts_of(model)
    for p in model.parameters():  # what DeepSpeed ZeRO-3 leaves outside a gather
        shape = p.shape
        p.data = torch.empty(0, dtype=p.dtype)
        p.ds_shape, p.ds_numel = shape, shape.numel()
    facts = facts_of(model)
    assert (facts.lora_params, facts.base_params) == (expected.lora_params, expected.base_params)
    assert [(lf.a_shape, lf.b_shape, lf.base_numel) for lf in facts.layers] == [
        (lf.a_shape, lf.b_shape, lf.base_numel) for lf in expected.layers
    ]


def test_flat_lora_views_use_module_features() -> None:
    """FSDP's use_orig_params exposes flat views: shapes come from the lora_A/B Linear features."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.flatten()
    facts = facts_of(model)
    assert {(lf.a_shape, lf.b_shape) for lf in facts.layers} == {((8, 64), (64, 8))}


class _FlatHolder(nn.Module):
    """A stand-in for an FSDP unit with use_orig_params=False: one flat parameter and its records."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        params = dict(inner.named_parameters())
        flat = nn.Parameter(torch.cat([p.detach().flatten() for p in params.values()]))
        flat._fqns = tuple(params)  # type: ignore[attr-defined]
        flat._shapes = tuple(p.shape for p in params.values())  # type: ignore[attr-defined]
        flat._numels = tuple(p.numel() for p in params.values())  # type: ignore[attr-defined]
        self._fsdp_wrapped_module = nn.Module()
        self._fsdp_wrapped_module._flat_param = flat


def test_fsdp_flat_parameter_expanded_by_records() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    expected = facts_of(model)
    facts = facts_of(_FlatHolder(model))
    assert (facts.lora_params, facts.base_params) == (expected.lora_params, expected.base_params)


class Params4bit(nn.Parameter):
    """Named like bitsandbytes' class: packed uint8 storage, two 4-bit values per byte."""


@pytest.mark.parametrize("with_quant_state", [True, False], ids=["quant-state-shape", "packed-x2"])
def test_4bit_base_weights_counted_at_true_size(with_quant_state: bool) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    expected = facts_of(model)
    base = model.base_model.model.model.layers[0].mlp.up_proj
    shape = base.weight.shape
    packed = Params4bit(torch.zeros(shape.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    if with_quant_state:
        packed.quant_state = type("QuantState", (), {"shape": shape})()  # type: ignore[attr-defined]
    base.weight = packed
    assert facts_of(model).base_params == expected.base_params


# --- first steps, with a real Trainer ---------------------------------------------------------------
@pytest.mark.slow
def test_trainer_run_reports_mistakes_and_writes_valid_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with caplog.at_level(logging.INFO, logger="lora_doctor"):
        callback = train(model, tmp_path)
    slugs = found(callback)
    assert {"alpha-rank-ratio", "lora-param-budget", "attention-only-targets"} <= slugs
    assert not slugs & {"adapter-not-learning", "adapter-shape", "no-trainable-params"}
    assert any("lora_alpha/r = 0.5 (r=16, lora_alpha=8)" in r.getMessage() for r in caplog.records)
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    jsonschema.validate(report, load_schema())
    assert report["run"]["adapters"]["default"]["r"] == 16
    assert report["run"]["lora_params"] == model.get_nb_trainable_parameters()[0]
    assert {f["slug"] for f in report["findings"]} == slugs


@pytest.mark.slow
def test_frozen_adapter_run(tmp_path: Path) -> None:
    """LoRA frozen, the classifier head (modules_to_save) trains: the adapters learn nothing."""
    model = get_peft_model(
        tiny_bert(),
        LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear"),
    )
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    callback = train(model, tmp_path, data=cls_data())
    assert {"no-trainable-params", "adapter-not-learning"} <= found(callback)
    assert callback.doctor is not None
    assert len(callback.doctor.facts.no_grad_layers) == len(callback.doctor.facts.layers)


@pytest.mark.slow
def test_optimizer_without_lora_params(tmp_path: Path) -> None:
    model = get_peft_model(
        tiny_bert(),
        LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear"),
    )
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    optimizer = torch.optim.AdamW(head, lr=1e-2)
    callback = train(model, tmp_path, data=cls_data(), optimizers=(optimizer, None))
    assert {"adapter-not-in-optimizer", "adapter-not-learning"} <= found(callback)
    assert callback.doctor is not None
    facts = callback.doctor.facts
    assert len(facts.not_in_optimizer) == 2 * len(facts.layers)
    assert facts.no_grad_layers == []  # they got gradients; they just never moved
    assert len(facts.b_still_zero_layers) == len(facts.layers)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("init", "extra_args"),
    [
        (True, {}),
        ("orthogonal", {}),
        ("pissa", {}),
        (False, {}),
        (True, {"warmup_steps": 2, "check_after_steps": 1}),  # the only checked step has lr 0
    ],
    ids=["default", "orthogonal-b-nonzero", "pissa-b-nonzero", "random-init", "warmup-from-zero"],
)
def test_learning_adapters_are_no_false_alarm(tmp_path: Path, init: Any, extra_args: dict) -> None:
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
    )
    callback = train(model, tmp_path, **extra_args)
    assert callback.doctor is not None
    facts = callback.doctor.facts
    assert not found(callback) & {"adapter-not-learning", "adapter-shape", "no-trainable-params"}
    assert facts.no_grad_layers == facts.b_still_zero_layers == facts.frozen_in_place == []


@pytest.mark.slow
def test_model_without_lora_trains_untouched(tmp_path: Path) -> None:
    callback = train(tiny_gpt2(), tmp_path, steps=2, learning_rate=1e-3)
    assert callback.doctor is not None
    assert [(f.slug, f.severity.value) for f in callback.doctor.findings] == [
        ("no-lora-adapter", "info")
    ]


class _PatchedLoraLinear(nn.Module):
    """A LoRA layer that is not a peft LoraLayer (as patched kernels such as Unsloth's may be)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.scaling = (
            {"default": r},
            {"default": alpha},
            {"default": alpha / r},
        )
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            self.base_layer(x)
            + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]
        )


def test_duck_typed_lora_layer_found() -> None:
    model = tiny_llama()
    model.requires_grad_(False)
    attn = model.model.layers[0].self_attn
    attn.q_proj = _PatchedLoraLinear(attn.q_proj, r=4, alpha=2)
    facts = facts_of(model)
    assert facts.has_lora is True
    ((lf),) = facts.layers
    assert (lf.name, lf.r, lf.scaling, lf.a_shape, lf.b_shape) == (
        "model.layers.0.self_attn.q_proj",
        4,
        0.5,
        (4, 64),
        (64, 4),
    )
    assert facts.lora_params == facts.trainable_lora_params == 4 * 64 * 2
    assert "alpha-rank-ratio" in setup_slugs(facts)


def test_resumed_past_first_steps_takes_no_copy() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    probe = AdapterProbe()
    doctor = Doctor(DoctorConfig(), RunFacts(), emit=False)
    state = type("State", (), {"global_step": 10})()
    probe.train_begin(Event(doctor=doctor, args=None, state=state, model=model))
    assert doctor.facts.has_lora is True
    assert probe._watched == []


def manual_run(
    model: nn.Module, steps: int = 2, lr: float = 1e-2, during: Any = contextlib.nullcontext
) -> Doctor:
    """The probe's hooks around a plain training loop, as the callback calls them; the loop runs
    inside ``during()`` (entered after the optimizer is built)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with during():
        return _hooked_steps(model, optimizer, steps)


def _hooked_steps(model: nn.Module, optimizer: Any, steps: int) -> Doctor:
    doctor: Doctor = probe_steps(model, optimizer, steps)
    doctor.run_phase(Phase.FIRST_STEPS, steps)
    return doctor


def test_inactive_adapter_is_no_false_alarm() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["down_proj"]))
    doctor = manual_run(model)
    facts = doctor.facts
    assert facts.no_grad_layers == facts.b_still_zero_layers == facts.frozen_in_place == []
    assert "adapter-not-learning" not in {f.slug for f in doctor.findings}


def test_disabled_adapters_are_not_learning() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.base_model.model.lm_head.weight.requires_grad_(True)  # something else still trains
    doctor = manual_run(model, during=model.disable_adapter)
    (finding,) = [f for f in doctor.findings if f.slug == "adapter-not-learning"]
    assert finding.severity.value == "error"
    assert len(doctor.facts.no_grad_layers) == 4


@pytest.mark.slow
def test_gradient_checkpointing_without_input_grads(tmp_path: Path) -> None:
    """The classic silent bug: reentrant checkpointing on a frozen base with no input that requires
    a gradient, so no gradient reaches the LoRA layers (their .grad stays None) while the head
    (modules_to_save) still learns. Not DeepSpeed: a None gradient here means none arrived."""
    model = get_peft_model(
        tiny_bert(),
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    callback = train(model, tmp_path, cls_data())
    facts = callback.doctor.facts
    assert "adapter-not-learning" in found(callback)
    assert len(facts.no_grad_layers) == len(facts.layers)
    assert len(facts.b_still_zero_layers) == len(facts.layers)
