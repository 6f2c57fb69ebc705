"""The probes' shared view of the model: roles, true sizes, optimizer membership, one walk."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import Rows, tiny_args, tiny_llama, tiny_peft
from torch import nn
from transformers import Trainer

from lora_doctor import LoraDoctorCallback
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.probes.base import Event
from lora_doctor.probes.memory import MemoryProbe, MemoryReading
from lora_doctor.probes.model import AdapterProbe
from lora_doctor.probes.spectrum import SpectrumProbe
from lora_doctor.probes.view import ModelView, Role


class CpuReader:
    """A memory reader for the CPU, so that the memory probe reads the model here too."""

    device_type = "cpu"

    def available(self) -> bool:
        return True

    def read(self, device: Any = None, reset: bool = True) -> MemoryReading:
        return MemoryReading("cpu", 1, 1, 1, 1, 2**36, 2**35, 0, 0)


def _model() -> Any:
    return get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "embed_tokens"],
            modules_to_save=["lm_head"],
        ),
    )


@pytest.mark.parametrize(
    ("name", "role", "adapter", "numel"),
    [
        ("model.layers.0.self_attn.q_proj.lora_A.default.weight", Role.LORA_A, "default", 4 * 64),
        ("model.layers.1.self_attn.q_proj.lora_B.default.weight", Role.LORA_B, "default", 64 * 4),
        ("model.embed_tokens.lora_embedding_A.default", Role.LORA_EMBEDDING_A, "default", 4 * 128),
        ("model.embed_tokens.lora_embedding_B.default", Role.LORA_EMBEDDING_B, "default", 64 * 4),
        ("lm_head.modules_to_save.default.weight", Role.MODULES_TO_SAVE, None, 128 * 64),
        ("lm_head.original_module.weight", Role.BASE, None, 128 * 64),
        ("model.layers.0.self_attn.q_proj.base_layer.weight", Role.BASE, None, 64 * 64),
    ],
    ids=[
        "lora-a",
        "lora-b",
        "embedding-a",
        "embedding-b",
        "modules-to-save",
        "saved-original",
        "base",
    ],
)
def test_roles_by_clean_name(name: str, role: Role, adapter: str | None, numel: int) -> None:
    params = {p.name: p for p in ModelView.build(_model()).params}
    assert (params[name].role, params[name].adapter, params[name].numel) == (role, adapter, numel)


def test_dora_magnitude_is_lora() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    )
    roles = {p.role for p in ModelView.build(model).params if p.role.is_lora}
    assert roles == {Role.LORA_A, Role.LORA_B, Role.LORA_MAGNITUDE}


def test_layers_and_configs_under_a_wrapper() -> None:
    model = _model()
    wrapper = nn.Module()
    wrapper.module = model  # what DDP and DeepSpeed's engine look like from outside
    view = ModelView.build(wrapper)
    assert view.model is model
    assert [layer.name for layer in view.layers] == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert view.layers[1].adapters == ("default",) and view.layers[1].active == {"default"}
    a, b = view.layers[1].weights("default")
    assert a is not None and b is not None and (a.shape, b.shape) == ((4, 64), (64, 4))
    assert view.configs["default"]["r"] == 4


def test_no_model_gives_an_empty_view() -> None:
    view = ModelView.build(None)
    assert not view.is_module and view.params == [] and view.layers == []


@pytest.mark.parametrize(
    ("optimizer_of", "expected"),
    [
        (lambda m: None, None),
        (lambda m: torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), None),
        (lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1), True),
        (lambda m: torch.optim.SGD([m.lm_head.modules_to_save.default.weight], lr=0.1), False),
    ],
    ids=["no-optimizer", "foreign-params-only", "all-trainable", "lora-left-out"],
)
def test_optimizer_membership(optimizer_of: Any, expected: bool | None) -> None:
    model = _model()
    view = ModelView.build(model, optimizer_of(model))
    lora = [p for p in view.params if p.role.is_lora]
    assert {view.in_optimizer(p) for p in lora} == {expected}


def _flat(params: dict[str, torch.Tensor]) -> nn.Parameter:
    """An FSDP1 flat parameter (use_orig_params=False) of ``params``, with its records."""
    flat = nn.Parameter(torch.cat([p.detach().flatten() for p in params.values()]))
    flat._fqns = tuple(params)  # type: ignore[attr-defined]
    flat._shapes = tuple(p.shape for p in params.values())  # type: ignore[attr-defined]
    flat._numels = tuple(p.numel() for p in params.values())  # type: ignore[attr-defined]
    return flat


class _FlatHolder(nn.Module):
    """A stand-in for nested FSDP1 units: one flat parameter per group of named parameters."""

    def __init__(self, *groups: dict[str, torch.Tensor]) -> None:
        super().__init__()
        unit: nn.Module = self
        for group in groups:
            inner = nn.Module()
            inner._flat_param = _flat(group)
            unit._fsdp_wrapped_module = inner
            unit = inner


def test_fsdp_flat_parameters_expanded_into_their_originals() -> None:
    model = tiny_peft(4, 8)
    plain = ModelView.build(model)
    named = dict(model.named_parameters())
    view = ModelView.build(_FlatHolder(named))
    assert [(p.name, p.numel, p.role) for p in view.params] == [
        (p.name, p.numel, p.role) for p in plain.params
    ]
    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert view.true_shape(torch.empty(0), name) == (4, 64)
    assert [is_lora for _, is_lora in view.tensors()] == [False]  # LoRA and base in one
    lora = {n: p for n, p in named.items() if "lora_" in n}
    base = {n: p for n, p in named.items() if "lora_" not in n}
    split = ModelView.build(_FlatHolder(base, lora))
    assert [is_lora for _, is_lora in split.tensors()] == [False, True]


def _walks(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each walk of ``model``'s module tree (a call of named_modules on the model itself:
    named_parameters, parameters and modules all start with one)."""
    walks: list[str] = []
    original = nn.Module.named_modules

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self is model:
            walks.append("walk")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return walks


def test_three_probes_walk_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the shared view, train begin walked the model five times (two for the adapter
    probe's records and counts, one for its layers, one each for the spectrum and memory)."""
    model = tiny_peft(4, 8)
    doctor = Doctor(DoctorConfig(), emit=False)
    state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True)
    args = SimpleNamespace(device=torch.device("cpu"))
    event = Event(doctor, args, state, model=model)
    probes = [AdapterProbe(), MemoryProbe(CpuReader()), SpectrumProbe(doctor.config)]
    walks = _walks(model, monkeypatch)
    for probe in probes:
        probe.train_begin(event)
    assert len(walks) == 1
    assert doctor.facts.lora_params > 0 and doctor.facts.memory.lora_bytes > 0
    assert event.model_view() is event.view  # built once, then shared


@pytest.mark.slow
def test_callback_walks_the_model_once_at_train_begin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_peft(4, 8)
    callback = LoraDoctorCallback(
        report_path=False, memory_reader=CpuReader(), config=DoctorConfig(time_budget=None)
    )
    trainer = Trainer(
        model=model,
        args=tiny_args(tmp_path, max_steps=2),
        train_dataset=Rows(),
        callbacks=[callback],
    )
    walks = _walks(model, monkeypatch)
    counted: list[int] = []
    on_train_begin = LoraDoctorCallback.on_train_begin

    def begin(self: LoraDoctorCallback, *args: Any, **kwargs: Any) -> None:
        before = len(walks)
        on_train_begin(self, *args, **kwargs)
        counted.append(len(walks) - before)

    monkeypatch.setattr(LoraDoctorCallback, "on_train_begin", begin)
    trainer.train()
    assert counted == [1]
    facts = callback.doctor.facts
    assert facts.memory.lora_bytes == facts.lora_params * 4  # fp32
    assert facts.spectrum  # the spectrum probe read the same layers
