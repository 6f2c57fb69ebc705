"""The memory probe and the out-of-memory report in a real Trainer on a tiny LoRA model (CPU):
scripted readings through an injected reader, CUDA stubs never touched, and an OOM raised from
the model's forward at step 3 that leaves the JSON and propagates unchanged."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tiny import tiny_peft  # noqa: E402

from lora_doctor import LoraDoctorCallback, watch  # noqa: E402
from lora_doctor.checks import Phase  # noqa: E402
from lora_doctor.checks.memory import KEY_PEAK_ALLOC  # noqa: E402
from lora_doctor.engine import Doctor  # noqa: E402
from lora_doctor.memory_estimate import GIB  # noqa: E402
from lora_doctor.probes.memory import MemoryReading  # noqa: E402

CAP = 80 * GIB
OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


class ScriptedReader:
    """Readings of an imaginary 80 GiB device, the peak at ``share`` of it."""

    device_type = "cpu"

    def __init__(self, share: float) -> None:
        self.share = share
        self.reads = 0

    def available(self) -> bool:
        return True

    def read(self, device: Any = None) -> MemoryReading:
        self.reads += 1
        peak = int(self.share * CAP)
        return MemoryReading("cuda:0", peak, peak, peak // 2, peak, CAP, CAP - peak, 0, 0)


def _model() -> Any:
    return tiny_peft(r=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj"))


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.arange(8) * (i + 1) % 128
        return {
            "input_ids": ids,
            "labels": ids.clone(),
            "attention_mask": torch.ones(8, dtype=torch.long),
        }


def _trainer(tmp_path: Path, callback: LoraDoctorCallback | None, steps: int = 4) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=_model(),
        args=args,
        train_dataset=_Data(),
        eval_dataset=_Data(),
        callbacks=[callback] if callback else None,
    )


def _oom_at_forward(trainer: Any, call: int) -> list[BaseException]:
    """Makes the model's ``call``-th forward raise a CUDA out-of-memory error; returns a list
    that receives the raised error (to check it is the one that propagates)."""
    inner = trainer.model.base_model.model
    original, calls, raised = inner.forward, [0], []

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raised.append(torch.OutOfMemoryError(OOM_TEXT))
            raise raised[-1]
        return original(*args, **kwargs)

    inner.forward = functools.wraps(original)(forward)  # the Trainer reads its signature
    return raised


@pytest.fixture
def no_cuda_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU torch's CUDA functions raise; make every one the probe could call raise loudly."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a torch.cuda function was called on a machine without CUDA")

    for name in (
        "memory_stats",
        "memory_stats_as_nested_dict",
        "mem_get_info",
        "reset_peak_memory_stats",
        "current_device",
        "max_memory_allocated",
        "memory_allocated",
        "synchronize",
        "get_device_properties",
    ):
        monkeypatch.setattr(torch.cuda, name, boom)


def _report(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "lora_doctor.json").read_text())


@pytest.mark.slow
def test_oom_in_forward_leaves_report_and_propagates_unchanged(
    tmp_path: Path, no_cuda_calls: None
) -> None:
    trainer = _trainer(tmp_path, LoraDoctorCallback(), steps=6)
    raised = _oom_at_forward(trainer, call=3)
    with pytest.raises(torch.OutOfMemoryError) as err:
        trainer.train()
    assert err.value is raised[0] and str(err.value) == OOM_TEXT
    assert err.traceback[-1].name == "forward"  # raised where it was raised
    report = _report(tmp_path)
    (oom,) = [f for f in report["findings"] if f["slug"] == "out-of-memory"]
    assert (oom["code"], oom["severity"], oom["step"]) == ("LD302", "error", 3)
    assert oom["evidence"]["where"] == "the training step"
    assert oom["evidence"]["tried_to_allocate"] == "2.00 GiB"
    assert oom["recommendation"]["config_changes"] == {
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
    }
    assert report["run"]["memory"]["available"] is False


@pytest.mark.slow
def test_cpu_run_touches_no_cuda_function(
    tmp_path: Path, no_cuda_calls: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lora_doctor"):
        _trainer(tmp_path, LoraDoctorCallback(), steps=2).train()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "internal error" in m]
    assert sum("the memory checks are off" in m for m in messages) == 1
    report = _report(tmp_path)
    assert "sees no CUDA device" in report["run"]["memory"]["reason"]
    assert not {"oom-risk", "out-of-memory"} & {f["slug"] for f in report["findings"]}


@pytest.mark.slow
@pytest.mark.parametrize(("share", "fires"), [(0.93, True), (0.5, False)], ids=["93pct", "50pct"])
def test_scripted_reader_in_trainer(tmp_path: Path, share: float, fires: bool) -> None:
    reader = ScriptedReader(share)
    callback = LoraDoctorCallback(memory_reader=reader)
    _trainer(tmp_path, callback, steps=4).train()
    doctor = callback.doctor
    assert doctor is not None
    assert doctor.history.series(KEY_PEAK_ALLOC).values.tolist() == [round(share * 80, 4)] * 5
    # train begin, the first steps' measurement, after each of the 4 steps (all logged), and the
    # end-of-training summary's log, which has no reading of its own
    assert reader.reads == 1 + 1 + 4 + 1
    report = _report(tmp_path)
    assert ("oom-risk" in {f["slug"] for f in report["findings"]}) is fires
    mem = report["run"]["memory"]
    assert mem["r"] == 8 and set(mem["estimates"]) == {"8", "16", "4"}
    assert mem["peak_bytes"] == int(share * CAP) and mem["last_reading"]["capacity_gib"] == 80.0
    assert mem["weights_by_dtype"]["fp32"] > 0 and mem["lora_bytes"] == mem["trainable_bytes"]
    # Adam: two fp32 moments per trainable parameter, plus a 4-byte step counter per tensor.
    assert (
        2 * mem["trainable_bytes"] <= mem["optimizer_state_bytes"] < 2.01 * mem["trainable_bytes"]
    )
    est = mem["estimates"]["16"]
    assert est["trainable"] == 2 * mem["estimates"]["8"]["trainable"] and est["complete"]


@pytest.mark.slow
def test_callback_added_after_init_still_reports_oom(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, None, steps=6)
    trainer.add_callback(LoraDoctorCallback())
    raised = _oom_at_forward(trainer, call=2)
    with pytest.raises(torch.OutOfMemoryError) as err:
        trainer.train()
    assert err.value is raised[0]
    (oom,) = [f for f in _report(tmp_path)["findings"] if f["slug"] == "out-of-memory"]
    assert oom["step"] == 2


@pytest.mark.slow
def test_watch_reports_oom_in_evaluation(tmp_path: Path) -> None:
    callback = LoraDoctorCallback()
    trainer = _trainer(tmp_path, callback, steps=1)
    trainer.train()
    _oom_at_forward(trainer, call=1)
    with pytest.raises(torch.OutOfMemoryError), watch(trainer):
        trainer.evaluate()
    (oom,) = [f for f in _report(tmp_path)["findings"] if f["slug"] == "out-of-memory"]
    assert oom["evidence"]["where"] == "evaluation" and oom["step"] == 1
    assert "per_device_eval_batch_size" in oom["recommendation"]["steps"][0]


def test_watch_custom_loop_with_doctor(tmp_path: Path) -> None:
    doctor = Doctor(emit=False)
    path = tmp_path / "run" / "lora_doctor.json"
    error = RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
    with pytest.raises(RuntimeError) as err, watch(doctor, report_path=path):
        for step in (1, 2):
            doctor.observe(step, {"loss": 1.0})
        raise error
    assert err.value is error
    (oom,) = json.loads(path.read_text())["findings"]
    assert (oom["slug"], oom["step"], oom["evidence"]["tried_to_allocate"]) == (
        "out-of-memory",
        3,
        "20.00 MiB",
    )


def test_watch_reports_other_errors_without_memory_figures(tmp_path: Path) -> None:
    doctor = Doctor(emit=False)
    doctor.run_phase(Phase.SETUP)
    path = tmp_path / "d.json"
    with pytest.raises(KeyError), watch(doctor, report_path=path):
        raise KeyError("batch")
    (died,) = json.loads(path.read_text())["findings"]
    assert (died["slug"], died["title"]) == ("training-died", "Training died of KeyError at step 0")


@pytest.mark.parametrize(
    ("target", "kwargs", "message"),
    [
        (object(), {}, "needs a Trainer built with callbacks=[LoraDoctorCallback()]"),
        (Doctor(emit=False), {}, "needs report_path with a Doctor"),
        (
            LoraDoctorCallback(),
            {"report_path": "x.json"},
            "set LoraDoctorCallback(report_path=...)",
        ),
    ],
    ids=["not-a-trainer", "doctor-without-path", "callback-with-path"],
)
def test_watch_rejects_bad_targets(target: Any, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err, watch(target, **kwargs):
        pass
    assert message in str(err.value)


def test_probe_reports_worst_rank_and_spread() -> None:
    """Every rank reads its own device; the logs carry the highest peak and the least headroom
    over ranks, and the peak's min/max with the rank that had it."""
    from types import SimpleNamespace

    from lora_doctor.probes.base import Event
    from lora_doctor.probes.dist import RankReadings, RankSpread
    from lora_doctor.probes.memory import MemoryProbe

    reader = ScriptedReader(0.5)
    probe, doctor, ranks = MemoryProbe(reader), Doctor(emit=False), RankReadings()
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1)
    state = SimpleNamespace(global_step=10, is_world_process_zero=True)
    probe.train_begin(Event(doctor, args, state, ranks=ranks))
    probe.step_end(
        Event(doctor, args, state, ranks=ranks, control=SimpleNamespace(should_log=True))
    )
    local = reader.read()
    other = int(0.95 * CAP)
    ranks.spread = {
        "mem_peak_allocated": RankSpread(local.peak_allocated, other, 0, 1, 2),
        "mem_headroom": RankSpread(CAP - other, local.headroom, 1, 0, 2),
    }
    logs: dict[str, Any] = {}
    probe.log(Event(doctor, args, state, logs=logs, ranks=ranks))
    assert logs[KEY_PEAK_ALLOC] == round(other / GIB, 4)
    assert logs["lora_doctor/mem_headroom_gib"] == round((CAP - other) / GIB, 4)
    assert logs[KEY_PEAK_ALLOC + "_min"] == 40.0 and logs[KEY_PEAK_ALLOC + "_max_rank"] == 1
    assert doctor.facts.memory.ranks == 2


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Fakes the allocator's counters on CPU torch; ``calls`` records resets and syncs."""
    nested = {
        "allocated_bytes": {"all": {"current": 5, "peak": 30}, "large_pool": {"peak": 99}},
        "reserved_bytes": {"all": {"current": 40, "peak": 45}},
        "num_alloc_retries": 7,
        "num_ooms": 1,
    }
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda d: nested)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (50, 100))
    for name in ("reset_peak_memory_stats", "reset_max_memory_allocated", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name: calls.append(_n))


def test_cuda_reader_parses_allocator_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA reader on faked torch.cuda calls: which counters it takes; it never resets a
    peak and never calls anything that synchronizes."""
    from lora_doctor.probes.memory import CudaMemoryReader

    calls: list[str] = []
    _fake_cuda(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reader = CudaMemoryReader()
    assert reader.available()
    r = reader.read()
    assert (r.device, r.peak_allocated, r.peak_reserved, r.allocated, r.reserved) == (
        "cuda:0",
        30,
        45,
        5,
        40,
    )
    assert (r.capacity, r.free, r.alloc_retries, r.ooms, r.outside, r.headroom) == (
        100,
        50,
        7,
        1,
        10,
        60,
    )
    assert calls == []


@pytest.mark.slow
def test_training_with_the_doctor_never_resets_the_peak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole run through the CUDA reader (faked counters, CPU training): the user's
    ``torch.cuda.max_memory_allocated()`` after training must still be the run's peak, so
    nothing may reset it."""
    from lora_doctor.probes.memory import CudaMemoryReader

    class CpuAsCuda(CudaMemoryReader):
        device_type = "cpu"

        def available(self) -> bool:
            return True

    calls: list[str] = []
    trainer = _trainer(tmp_path, LoraDoctorCallback(memory_reader=CpuAsCuda()), steps=3)
    _fake_cuda(monkeypatch, calls)
    trainer.train()
    assert calls == []
    report = _report(tmp_path)
    assert report["run"]["memory"]["peak_bytes"] == 30


class AllocatorModel:
    """A CUDA caching allocator as the doctor sees it, on an imaginary 80 GiB device: at step s
    the run holds ``held(s)`` GiB between steps and peaks ``transient(s)`` GiB above that within
    the step; a reading reports the highest peak so far (never reset) and what is held now."""

    device_type = "cpu"

    def __init__(self, held: Any, transient: Any) -> None:
        self.held, self.transient = held, transient
        self.step: Any = lambda: 0
        self._peak = self._seen = 0

    def available(self) -> bool:
        return True

    def read(self, device: Any = None) -> MemoryReading:
        now = int(self.step())
        for s in range(self._seen + 1, now + 1):  # the steps since the previous reading
            self._peak = max(self._peak, int((self.held(s) + self.transient(s)) * GIB))
        self._seen = max(self._seen, now)
        held = int(self.held(now) * GIB)
        peak = max(self._peak, held)
        return MemoryReading("cuda:0", peak, peak, held, peak, CAP, CAP - peak - GIB // 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("held", "transient", "fires"),
    [
        (lambda s: 20 + 2 * s, lambda s: 10, True),
        (lambda s: 20, lambda s: 45 if s == 3 else 10 + (s % 5), False),
        (lambda s: 20 + (s % 3) * 0.5, lambda s: 10, False),
    ],
    ids=["leak-2gib-per-step", "spike-then-flat", "held-jitter"],
)
def test_growth_rule_on_a_modelled_allocator(
    tmp_path: Path, held: Any, transient: Any, fires: bool
) -> None:
    """The growth rule in a real Trainer run, read through the allocator's never-reset peak and
    the memory held between steps: a leak fires before the peak share does; a one-off spike that
    sets the peak early, or jitter in the held memory, stays quiet."""
    reader = AllocatorModel(held, transient)
    callback = LoraDoctorCallback(memory_reader=reader)
    trainer = _trainer(tmp_path, callback, steps=30)
    reader.step = lambda: trainer.state.global_step
    trainer.train()
    risk = [f for f in _report(tmp_path)["findings"] if f["slug"] == "oom-risk"]
    assert [f["evidence"]["rule"] for f in risk] == (["growth"] if fires else [])
    if fires:
        # the peak, 30 + 2 s GiB, reaches the 79.5 GiB available near step 25; the peak share
        # (90%) would not fire before step 21
        assert risk[0]["step"] < 15 and 24 <= risk[0]["evidence"]["full_at_step"] <= 26


def _benchmark(name: str = "gpu_memory") -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_refuses_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _benchmark().main(["--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_gpu_benchmark_dry_run_passes_its_checks(tmp_path: Path) -> None:
    """The GPU script's logic on CPU with scripted readings: every part passes and leaves its
    report (the figures are not measurements)."""
    assert _benchmark().main(["--dry", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_memory.json").read_text())
    assert all(results["checks"].values())
    assert results["a_out_of_memory"]["error"].startswith("OutOfMemoryError")


def test_peak_counter_benchmark_refuses_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _benchmark("gpu_peak_counters").main(["--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_peak_counter_benchmark_dry_run(tmp_path: Path) -> None:
    """The GPU script's flow on CPU: three runs (without, with, without the doctor), identical
    losses, the doctor's report written (there are no CUDA counters to compare on CPU)."""
    module = _benchmark("gpu_peak_counters")
    assert module.main(["--dry", "--steps", "10", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_peak_counters.json").read_text())
    assert set(results["checks"]) == {
        "the doctor wrote its report",
        "same losses with and without the doctor",
    }
    assert all(results["checks"].values()) and len(results["runs"]["with"]["losses"]) == 2
