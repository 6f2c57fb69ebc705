"""LoopDoctor: the Trainer callback's adapter checks, curves and JSON in a plain PyTorch loop."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import Rows, tiny_peft

from lora_doctor import DoctorConfig, LoopDoctor
from lora_doctor.checks import Phase
from lora_doctor.checks.memory import KEY_PEAK_ALLOC
from lora_doctor.memory_estimate import GIB
from lora_doctor.probes.memory import MemoryReading

#: The tiny model's own findings (its adapter is a large share of a tiny base; q/v targets).
QUIET = {"lora-param-budget", "attention-only-targets"}


def _optimizer(model: Any, only: str | None = None, lr: float = 1e-3) -> torch.optim.Optimizer:
    params = [
        p for n, p in model.named_parameters() if p.requires_grad and (only is None or only in n)
    ]
    return torch.optim.AdamW(params, lr=lr)


def _train(
    model: Any,
    optimizer: torch.optim.Optimizer,
    doctor: LoopDoctor | None,
    steps: int = 4,
    accumulate: int = 1,
    log_every: int = 1,
) -> list[float]:
    """A plain loop over Rows; returns each micro-batch's loss."""
    loader = torch.utils.data.DataLoader(Rows(n=32), batch_size=2)
    losses: list[float] = []
    batches = iter(loader)
    for step in range(1, steps + 1):
        for _ in range(accumulate):
            loss = model(**next(batches)).loss
            (loss / accumulate).backward()
            losses.append(loss.item())
            if doctor is not None and len(losses) % accumulate != 0:
                doctor.on_train_batch_end()  # a micro-batch without an optimizer step
        if doctor is not None:
            doctor.on_before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        if doctor is not None:
            doctor.on_train_batch_end({"loss": loss} if step % log_every == 0 else None)
    return losses


def _slugs(doctor: LoopDoctor) -> set[str]:
    return {f.slug for f in doctor.doctor.findings}


def _freeze(model: Any, part: str) -> Any:
    for name, p in model.named_parameters():
        if part in name:
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    ("make_model", "only", "fires", "quiet"),
    [
        (tiny_peft, None, set(), {"adapter-not-learning", "adapter-not-in-optimizer"}),
        (tiny_peft, "lora_A", {"adapter-not-in-optimizer", "adapter-not-learning"}, set()),
        (lambda: _freeze(tiny_peft(), "lora_B"), None, {"adapter-not-learning"}, set()),
    ],
    ids=["healthy", "lora-B-not-in-optimizer", "lora-B-frozen"],
)
def test_adapter_checks_in_a_custom_loop(
    tmp_path: Path,
    make_model: Callable[[], Any],
    only: str | None,
    fires: set[str],
    quiet: set[str],
) -> None:
    model = make_model()
    optimizer = _optimizer(model, only)
    report = tmp_path / "lora_doctor.json"
    with LoopDoctor(
        model, optimizer, max_steps=4, report_path=report, config={"ignore": QUIET}
    ) as doctor:
        _train(model, optimizer, doctor)
    slugs = _slugs(doctor)
    assert fires <= slugs
    assert not quiet & slugs
    saved = json.loads(report.read_text())
    assert {f["slug"] for f in saved["findings"]} == slugs
    assert saved["run"]["global_step"] == 4


def test_first_steps_checks_run_once_the_optimizer_has_stepped(tmp_path: Path) -> None:
    """With gradient accumulation, micro-batches without an optimizer step do not count: the
    first-steps checks run after the second optimizer step, not the second batch."""
    model = tiny_peft()
    optimizer = _optimizer(model, only="lora_A")
    doctor = LoopDoctor(model, optimizer, max_steps=4, config={"ignore": QUIET})
    doctor.on_train_start()
    loader = iter(torch.utils.data.DataLoader(Rows(), batch_size=2))
    for batch in range(1, 5):  # two optimizer steps of two micro-batches
        model(**next(loader)).loss.backward()
        if batch % 2 == 0:
            doctor.on_before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
        found = {f.slug for f in doctor.on_train_batch_end()}
        assert ("adapter-not-learning" in found) is (batch == 4), batch
    assert doctor.doctor.step == 2


def test_the_loop_trains_the_same_with_and_without_the_doctor(tmp_path: Path) -> None:
    runs = []
    for with_doctor in (False, True):
        model = tiny_peft(seed=3)
        optimizer = _optimizer(model)
        if with_doctor:
            doctor = LoopDoctor(model, optimizer, max_steps=6, report_path=tmp_path / "d.json")
            with doctor:
                losses = _train(model, optimizer, doctor, steps=6, accumulate=2)
        else:
            losses = _train(model, optimizer, None, steps=6, accumulate=2)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        runs.append((losses, weights, torch.random.get_rng_state()))
    (losses0, weights0, rng0), (losses1, weights1, rng1) = runs
    assert losses0 == losses1
    assert all(torch.equal(weights0[n], weights1[n]) for n in weights0)
    assert torch.equal(rng0, rng1)


def test_metrics_curves_and_learning_rate_from_the_optimizer() -> None:
    model = tiny_peft()
    optimizer = _optimizer(model, lr=3e-4)
    with LoopDoctor(model, optimizer, max_steps=4, config={"ignore": QUIET}) as doctor:
        _train(model, optimizer, doctor, log_every=2)
        doctor.on_validation_end({"loss": torch.tensor(2.5)})
    history = doctor.doctor.history
    assert history.series("loss").steps.tolist() == [2.0, 4.0]  # tensors became numbers
    assert history.series("learning_rate").values.tolist() == [3e-4, 3e-4]
    assert history.series("eval_loss").values.tolist() == [2.5]
    assert doctor.doctor.facts.learning_rate == 3e-4
    assert doctor.doctor.facts.max_steps == 4


def test_a_dying_loop_leaves_the_report_and_its_error(tmp_path: Path) -> None:
    model = tiny_peft()
    optimizer = _optimizer(model)
    report = tmp_path / "lora_doctor.json"
    with pytest.raises(IndexError, match="index out of range"):  # noqa: SIM117
        with LoopDoctor(model, optimizer, max_steps=4, report_path=report) as doctor:
            _train(model, optimizer, doctor, steps=1)
            model(input_ids=torch.tensor([[500]]), labels=torch.tensor([[500]]))
    died = [f for f in json.loads(report.read_text())["findings"] if f["slug"] == "training-died"]
    assert len(died) == 1
    assert died[0]["step"] == 1


def test_an_internal_error_switches_the_hook_off_and_training_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = tiny_peft()
    optimizer = _optimizer(model)
    doctor = LoopDoctor(model, optimizer, max_steps=4, report_path=tmp_path / "d.json")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the doctor")

    monkeypatch.setattr(doctor.doctor, "observe", broken)
    with caplog.at_level(logging.WARNING, logger="lora_doctor"), doctor:
        losses = _train(model, optimizer, doctor)
    assert len(losses) == 4
    errors = [r for r in caplog.records if "internal error in on_train_batch_end" in r.message]
    assert len(errors) == 1
    assert (tmp_path / "d.json").exists()


def test_state_dict_resumes_without_reporting_twice(tmp_path: Path) -> None:
    model = tiny_peft()
    optimizer = _optimizer(model, only="lora_A")
    first = LoopDoctor(model, optimizer, max_steps=8, config={"ignore": QUIET})
    with first:
        _train(model, optimizer, first, steps=4)
    assert "adapter-not-learning" in _slugs(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives a JSON round trip

    resumed = LoopDoctor(model, optimizer, max_steps=8, config={"ignore": QUIET})
    resumed.load_state_dict(state)
    new = resumed.on_train_start()
    assert resumed.doctor.step == 4
    assert not {f.slug for f in new} & _slugs(first)  # already reported before the checkpoint
    assert len(resumed.doctor.history.series("loss")) == 4
    found = resumed.on_train_batch_end({"loss": 1.0}, step=5)
    assert "adapter-not-learning" not in {f.slug for f in found}


def test_stop_on_tells_the_loop_to_stop() -> None:
    model = tiny_peft()
    optimizer = _optimizer(model, only="lora_A")
    doctor = LoopDoctor(
        model, optimizer, max_steps=4, config=DoctorConfig(stop_on={"adapter-not-in-optimizer"})
    )
    doctor.on_train_start()
    assert doctor.should_stop
    assert doctor.doctor.stop_reason is not None
    assert doctor.doctor.stop_reason.slug == "adapter-not-in-optimizer"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"report_path": 3}, "report_path"),
        ({"max_step": 10}, "unknown run facts"),
        ({"config": {"check_after_steps": 0}}, "check_after_steps"),
    ],
    ids=["report-path", "unknown-fact", "bad-config"],
)
def test_wrong_options_get_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoopDoctor(torch.nn.Linear(2, 2), **kwargs)


def test_phases_follow_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each hook runs its phase once: SETUP at the start, FIRST_STEPS at check_after_steps,
    END at the end."""
    model = tiny_peft()
    optimizer = _optimizer(model)
    doctor = LoopDoctor(model, optimizer, max_steps=4)
    phases: list[Phase] = []
    run_phase = doctor.doctor.run_phase

    def spy(phase: Phase, step: int | None = None) -> Any:
        phases.append(phase)
        return run_phase(phase, step)

    monkeypatch.setattr(doctor.doctor, "run_phase", spy)
    with doctor:
        _train(model, optimizer, doctor, log_every=10)
    assert phases == [Phase.SETUP, Phase.FIRST_STEPS, Phase.END]


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="the lightning extra is not installed"
)
def test_a_fabric_loop_gets_the_same_checks() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = tiny_peft()
    model, optimizer = fabric.setup(model, _optimizer(model, only="lora_A"))
    with LoopDoctor(model, optimizer, max_steps=3, config={"ignore": QUIET}) as doctor:
        for batch in list(torch.utils.data.DataLoader(Rows(), batch_size=2))[:3]:
            fabric.backward(model(**batch).loss)
            doctor.on_before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
            doctor.on_train_batch_end()
    assert {"adapter-not-in-optimizer", "adapter-not-learning"} <= _slugs(doctor)
    layers = doctor.doctor.facts.b_still_zero_layers
    assert layers[0] == "model.layers.0.self_attn.q_proj"  # no wrapper parts in the names


class _Reader:
    """A scripted device-memory reader for the CPU (the memory probe reads any device type)."""

    device_type = "cpu"

    def available(self) -> bool:
        return True

    def read(self, device: Any = None) -> MemoryReading:
        return MemoryReading("cpu", 3 * GIB, 4 * GIB, GIB, 4 * GIB, 8 * GIB, 4 * GIB)


def test_the_memory_probe_reads_at_the_logged_steps() -> None:
    model = tiny_peft()
    optimizer = _optimizer(model)
    with LoopDoctor(model, optimizer, max_steps=4, memory_reader=_Reader()) as doctor:
        _train(model, optimizer, doctor, log_every=2)
    peaks = doctor.doctor.history.series(KEY_PEAK_ALLOC)
    assert peaks.steps.tolist() == [2.0, 4.0]
    assert peaks.values.tolist() == [3.0, 3.0]
    memory = doctor.doctor.facts.memory
    assert memory is not None
    assert memory.static_bytes == GIB  # measured once, after check_after_steps
    assert memory.optimizer_state_bytes  # AdamW's states exist by then


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loop_reads_memory_and_leaves_the_peak_alone() -> None:
    model = tiny_peft().cuda()
    optimizer = _optimizer(model)
    torch.cuda.reset_peak_memory_stats()
    loader = torch.utils.data.DataLoader(Rows(), batch_size=2)
    with LoopDoctor(model, optimizer, max_steps=4) as doctor:
        for step, batch in enumerate(loader, 1):
            loss = model(**{k: v.cuda() for k, v in batch.items()}).loss
            loss.backward()
            doctor.on_before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
            doctor.on_train_batch_end({"loss": loss})
            if step == 4:
                break
    peaks = doctor.doctor.history.series(KEY_PEAK_ALLOC).values.tolist()
    assert len(peaks) == 4
    assert torch.cuda.max_memory_allocated() / GIB >= max(peaks) > 0  # the user's peak, untouched
    assert "adapter-not-learning" not in _slugs(doctor)


def test_step_hooks_before_the_start_start_the_doctor_and_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without `with doctor:` the first step hook starts the doctor (its set-up checks run then)
    and says once how to call it."""
    model = tiny_peft()
    doctor = LoopDoctor(model, _optimizer(model), max_steps=4)
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        _train(model, _optimizer(model), doctor)
    said = [r.getMessage() for r in caplog.records if "came before on_train_start()" in r.message]
    assert len(said) == 1 and said[0].startswith("lora-doctor: on_before_optimizer_step() came")
    assert doctor.doctor.facts.has_lora is True and doctor.doctor.facts.adapters


def test_a_loop_without_on_before_optimizer_step_is_told(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_peft()
    optimizer = _optimizer(model)
    loader = iter(torch.utils.data.DataLoader(Rows(n=32), batch_size=2))
    with (
        caplog.at_level(logging.WARNING, logger="lora_doctor"),
        LoopDoctor(model, optimizer) as doctor,
    ):
        for _ in range(4):
            model(**next(loader)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            doctor.on_train_batch_end()
    said = [
        r.getMessage()
        for r in caplog.records
        if "on_before_optimizer_step() was never" in r.message
    ]
    assert len(said) == 1
