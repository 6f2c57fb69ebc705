"""DeepSpeed ZeRO-3: shapes and counts from ds_shape/ds_numel, gradients through DeepSpeed's
accessors (``deepspeed.utils.safe_get_full_grad`` / ``safe_get_full_fp32_param``).

DeepSpeed is not installed here: the parameters are partitioned by hand the way ZeRO-3 leaves them
(an empty local tensor carrying ``ds_shape`` and ``ds_numel``) and a stand-in ``deepspeed.utils``
answers from the full tensors, as DeepSpeed's gathers would.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_peft

from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.probes.base import Event
from lora_doctor.probes.model import AdapterProbe


def _partition(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Empties every LoRA weight as ZeRO-3 does; returns the full values by parameter id."""
    full: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            full[id(p)] = p.detach().clone()
            p.ds_shape = tuple(p.shape)  # type: ignore[attr-defined]
            p.ds_numel = p.numel()  # type: ignore[attr-defined]
            p.data = torch.empty(0)
    return full


@pytest.fixture
def fake_deepspeed(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[int, torch.Tensor]]:
    store: dict[str, dict[int, torch.Tensor]] = {"param": {}, "grad": {}}
    utils = types.ModuleType("deepspeed.utils")
    utils.safe_get_full_fp32_param = lambda p: store["param"][id(p)].clone()  # type: ignore[attr-defined]
    utils.safe_get_full_grad = lambda p: store["grad"].get(id(p))  # type: ignore[attr-defined]
    package = types.ModuleType("deepspeed")
    package.utils = utils  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepspeed", package)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return store


def _event(doctor: Doctor, model: torch.nn.Module, step: int) -> Event:
    return Event(doctor=doctor, args=None, state=SimpleNamespace(global_step=step), model=model)


@pytest.mark.parametrize(
    ("frozen", "expected_no_grad"),
    [(False, []), (True, ["model.layers.1.self_attn.v_proj"])],
    ids=["all-learning", "one-layer-without-gradient"],
)
def test_zero3_shapes_counts_and_gradients(
    fake_deepspeed: dict[str, dict[int, torch.Tensor]], frozen: bool, expected_no_grad: list[str]
) -> None:
    model = tiny_peft(4, 8)
    fake_deepspeed["param"] = _partition(model)
    doctor = Doctor(DoctorConfig(check_after_steps=1), emit=False)
    probe = AdapterProbe()
    probe.train_begin(_event(doctor, model, 0))

    facts = doctor.facts
    shapes = {lf.name: (lf.a_shape, lf.b_shape) for lf in facts.layers}
    assert shapes["model.layers.0.self_attn.q_proj"] == ((4, 64), (64, 4))
    assert shapes["model.layers.1.self_attn.v_proj"] == ((4, 64), (32, 4))
    assert facts.lora_params == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)

    # One "step": every LoRA weight gets a gradient and moves, except the frozen layer's.
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        stuck = frozen and "layers.1.self_attn.v_proj" in name
        grad = torch.zeros(p.ds_shape) if stuck else torch.full(p.ds_shape, 0.1)  # type: ignore[attr-defined]
        fake_deepspeed["grad"][id(p)] = grad
        fake_deepspeed["param"][id(p)] = fake_deepspeed["param"][id(p)] - grad
    probe.pre_optimizer_step(_event(doctor, model, 0))
    probe.step_end(_event(doctor, model, 1))
    assert facts.no_grad_layers == expected_no_grad
    assert facts.frozen_in_place == expected_no_grad
    assert facts.b_still_zero_layers == expected_no_grad  # B starts at zero and did not move


def test_zero3_without_deepspeed_is_unknown_not_a_finding() -> None:
    model = tiny_peft(4, 8)
    _partition(model)
    doctor = Doctor(DoctorConfig(check_after_steps=1), emit=False)
    probe = AdapterProbe()
    probe.train_begin(_event(doctor, model, 0))
    probe.pre_optimizer_step(_event(doctor, model, 0))
    probe.step_end(_event(doctor, model, 1))
    assert doctor.facts.layers[0].a_shape == (4, 64)
    assert doctor.facts.no_grad_layers == doctor.facts.frozen_in_place == []
