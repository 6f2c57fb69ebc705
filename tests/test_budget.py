"""The doctor's time budget: the reading planner as a table, the ledger, and whole runs of 100 and
10,000 steps on a fake clock (scripted step time, hook costs and reading cost; nothing is timed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama
from transformers import TrainerControl, TrainerState, TrainingArguments

from lora_doctor import DoctorConfig, LoraDoctorCallback
from lora_doctor.engine import Doctor
from lora_doctor.facts import OverheadFacts, RunFacts
from lora_doctor.probes import budget as budget_module
from lora_doctor.probes import spectrum as spectrum_module
from lora_doctor.probes.base import Event
from lora_doctor.probes.budget import Ledger, TimeBudget, layers_to_read
from lora_doctor.probes.dist import RankReadings, RankSpread
from lora_doctor.probes.spectrum import SpectrumProbe

SHARE = 0.005

# A reading's decision at the last of 100 steps of 0.1 s: 112 layers at 1 ms each, 10.5 ms spent,
# 50 ms allowed (0.5% of 10 s): 39.5 ms left.
LEDGER = Ledger(
    step=100, wall=10.0, spent=0.0105, step_seconds=0.1, per_step=0.0, layer_seconds=0.001
)

PLAN_CASES = [
    # (id, ledger changes, keyword changes, layers read)
    ("no-limit", {}, {"share": None}, 112),
    ("cost-not-measured", {"layer_seconds": None}, {}, 0),
    ("final-reads-what-fits", {}, {}, 39),
    ("final-reads-all-when-it-fits", {"wall": 40.0}, {}, 112),
    ("nothing-left", {"spent": 0.05}, {}, 0),
    ("fewer-than-minimum-skipped", {"spent": 0.0345}, {}, 0),
    ("minimum-fits", {"spent": 0.0335}, {}, 16),
    ("small-model-all-or-nothing", {"wall": 1.0, "spent": 0.0}, {"total": 6}, 0),
    ("small-model-fits", {"wall": 2.0, "spent": 0.0}, {"total": 6}, 6),
    # a periodic reading leaves room for a full final reading (112 ms) at max_steps
    ("periodic-keeps-the-final", {}, {"final": False, "max_steps": 200}, 0),
    ("periodic-long-run", {}, {"final": False, "max_steps": 1000}, 39),
    ("periodic-tight-end", {}, {"final": False, "max_steps": 278}, 16),
    # the doctor's per-step cost until the end counts against it too
    ("per-step-cost-ahead", {"per_step": 0.0002}, {"final": False, "max_steps": 278}, 0),
    # an exchanged ledger, taken at an earlier log, is carried forward to the decision's step
    ("projected-from-an-earlier-log", {"step": 50, "wall": 5.0}, {}, 39),
    ("pending-readings-since-the-log", {"step": 50, "wall": 5.0}, {"pending": 0.02}, 19),
]


@pytest.mark.parametrize(
    ("ledger", "kwargs", "want"),
    [c[1:] for c in PLAN_CASES],
    ids=[c[0] for c in PLAN_CASES],
)
def test_layers_to_read(ledger: dict, kwargs: dict, want: int) -> None:
    values: dict[str, Any] = {
        "share": SHARE,
        "step": 100,
        "max_steps": 100,
        "total": 112,
        "minimum": 16,
        "final": True,
    }
    values.update(kwargs)
    assert layers_to_read(dataclasses.replace(LEDGER, **ledger), **values) == want


def test_ledger_from_the_exchange_takes_the_conservative_side() -> None:
    assert Ledger.from_spread({}) is None
    spread = {
        "budget_step": RankSpread(40, 40),
        "budget_wall": RankSpread(4.0, 4.2),
        "budget_spent": RankSpread(0.01, 0.03),
        "budget_step_seconds": RankSpread(0.1, 0.105),
        "budget_per_step": RankSpread(1e-4, 2e-4),
        "budget_layer_seconds": RankSpread(0.001, 0.002),
    }
    assert Ledger.from_spread(spread) == Ledger(40, 4.0, 0.03, 0.1, 2e-4, 0.002)


class FakeClock:
    """Seconds that pass only when told to."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_time_budget_accounts_per_step_cost_apart_from_one_time_work_and_readings() -> None:
    clock = FakeClock()
    budget = TimeBudget(SHARE, first_steps=2, clock=clock)
    ranks = RankReadings()

    def hook(seconds: float, step: int, reading: float = 0.0, waited: float = 0.0) -> None:
        """A hook as the callback charges it: work, maybe a reading after waiting for the
        training's queued device work."""
        since = clock()
        clock.advance(seconds)
        if reading:
            budget.wait(lambda: clock.advance(waited), step)
            clock.advance(reading)
            budget.spectrum(reading, step, layers=4)
        budget.charge(since, step)

    hook(0.05, 0)  # start-up walk
    hook(0.02, 2)  # first-steps checks
    for step in range(3, 11):
        clock.advance(0.1)  # the training's step
        hook(0.001, step)
    hook(0.0, 10, reading=0.004, waited=0.0005)
    ledger = budget.ledger(10)
    assert ledger.spent == pytest.approx(0.05 + 0.02 + 8 * 0.001 + 0.004)
    assert ledger.wall == pytest.approx(0.8 + 0.078 + 0.0005 + 0.004)
    assert ledger.step_seconds == pytest.approx(ledger.wall / 10)
    assert ledger.per_step == pytest.approx(0.001)  # 8 steps past the first steps
    assert ledger.layer_seconds == pytest.approx(0.001)
    budget.put(ranks, 10)
    assert Ledger.from_spread(ranks.exchange()) == ledger
    assert budget.facts == OverheadFacts(
        time_budget=SHARE,
        wall_seconds=pytest.approx(0.8825),
        doctor_seconds=pytest.approx(0.082),
        waited_seconds=pytest.approx(0.0005),
        spectrum_seconds=pytest.approx(0.004),
        spectrum_layer_seconds=pytest.approx(0.001),
    )


def test_a_spectrum_start_up_past_the_first_steps_is_not_a_per_step_cost() -> None:
    """The spectrum's start-up, deferred to its first affordable reading, may come at any step:
    like a reading, it is left out of the per-step cost projected forward."""
    clock = FakeClock()
    budget = TimeBudget(SHARE, first_steps=2, clock=clock)
    for step in range(1, 11):
        clock.advance(0.1)
        since = clock()
        clock.advance(0.001)
        if step == 10:
            clock.advance(0.03)
            budget.spectrum(0.03, step)  # the start-up: no layers
        budget.charge(since, step)
    ledger = budget.ledger(10)
    assert ledger.per_step == pytest.approx(0.001)  # the 8 steps past the first steps
    assert ledger.spent == pytest.approx(0.04) and ledger.layer_seconds is None


# --- whole runs on a fake clock ---------------------------------------------------------------
#: Scripted costs, in seconds: the training's step, the doctor's work in each of its hooks (the
#: probes' part; the checks of a log included) and reading one layer's spectrum.
STEP = 0.1
HOOK_COST = {"train_begin": 0.005, "pre_optimizer_step": 5e-5, "step_end": 5e-5, "log": 2e-4}
LAYER = 0.0015


def _all_linear_peft() -> Any:
    """The tiny Llama with LoRA on every linear layer: 2 blocks x 7 = 14 LoRA layers."""
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The budget's clock, advanced by the scripted costs: each layer read costs ``LAYER``. The
    process starts with no spectrum read (the spectrum's prior counts the library load)."""
    fake = FakeClock()
    monkeypatch.setattr(budget_module, "now", fake)
    monkeypatch.setattr(spectrum_module, "_LOADED", set())
    read = spectrum_module.lowrank_singular_values

    def costly(*args: Any, **kwargs: Any) -> torch.Tensor:
        fake.advance(LAYER)
        return read(*args, **kwargs)

    monkeypatch.setattr(spectrum_module, "lowrank_singular_values", costly)
    return fake


@dataclasses.dataclass
class Run:
    """What a driven run left: its facts, and after each spectrum reading the doctor's and the
    wall's seconds so far and the names of the layers it read."""

    facts: RunFacts
    after: list[tuple[float, float]]
    names: list[list[str]]


def _drive(
    tmp_path: Path, clock: FakeClock, max_steps: int, logging_steps: int, **config: Any
) -> Run:
    """Calls the callback's hooks as the Trainer does, for ``max_steps`` steps of ``STEP`` seconds
    on the fake clock."""
    model = _all_linear_peft()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    callback = LoraDoctorCallback(
        report_path=False, config=DoctorConfig(spectrum_min_layers=4, **config)
    )
    call = callback._call

    def costly_call(hook: str, event: Event) -> None:  # inside the guarded hook: charged
        clock.advance(HOOK_COST.get(hook, 0.0))
        call(hook, event)

    callback._call = costly_call  # type: ignore[method-assign]
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], logging_steps=logging_steps
    )
    state = TrainerState(max_steps=max_steps, logging_steps=logging_steps)
    control = TrainerControl()
    kw = {"model": model, "optimizer": optimizer}
    callback.on_train_begin(args, state, control, **kw)
    assert callback.doctor is not None
    facts = callback.doctor.facts
    run = Run(facts, [], [])

    def note(readings: int) -> None:
        if len(facts.spectrum) > readings:
            assert facts.overhead is not None
            run.after.append((facts.overhead.doctor_seconds, facts.overhead.wall_seconds))
            run.names.append([lay.name for lay in facts.spectrum[-1].layers])

    for step in range(1, max_steps + 1):
        clock.advance(STEP)
        callback.on_pre_optimizer_step(args, state, control, **kw)
        state.global_step = step
        control.should_log = step % logging_steps == 0
        readings = len(facts.spectrum)
        callback.on_step_end(args, state, control, **kw)
        note(readings)
        if control.should_log:
            callback.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": 1.0}, **kw)
    readings = len(facts.spectrum)
    callback.on_train_end(args, state, control, **kw)
    note(readings)
    return run


LAYERS = 14


@pytest.fixture
def base_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the base weights whose norm the spectrum's start-up reads, in order."""
    calls: list[str] = []
    base_norm = spectrum_module._base_norm

    def counted(base: Any) -> Any:
        calls.append(type(base).__name__)
        return base_norm(base)

    monkeypatch.setattr(spectrum_module, "_base_norm", counted)
    return calls


@pytest.mark.parametrize(
    ("max_steps", "logging_steps"), [(100, 10), (10_000, 100)], ids=["100-steps", "10000-steps"]
)
def test_the_budget_is_kept_and_readings_adapt(
    tmp_path: Path, clock: FakeClock, base_reads: list[str], max_steps: int, logging_steps: int
) -> None:
    run = _drive(tmp_path, clock, max_steps, logging_steps)
    spent = run.facts.overhead
    assert spent is not None and spent.time_budget == SHARE
    assert len(base_reads) == LAYERS  # one start-up, before the first reading
    # the doctor's time is exactly the scripted one: its hooks, a start-up that reads one layer
    # twice (the first read loads the linear-algebra libraries), and every layer read
    readings = run.facts.spectrum
    layers_read = sum(s.layers_read for s in readings)
    logs = max_steps // logging_steps
    scripted = (
        HOOK_COST["train_begin"]
        + 2 * LAYER
        + max_steps * (HOOK_COST["pre_optimizer_step"] + HOOK_COST["step_end"])
        + logs * HOOK_COST["log"]
        + layers_read * LAYER
    )
    assert spent.doctor_seconds == pytest.approx(scripted)
    assert spent.wall_seconds == pytest.approx(max_steps * STEP + scripted)
    assert spent.spectrum_layer_seconds == pytest.approx(LAYER)
    # the budget is kept: at the end, and right after every reading
    assert spent.doctor_seconds <= SHARE * spent.wall_seconds
    assert all(doctor <= SHARE * wall for doctor, wall in run.after)
    steps = [s.step for s in readings]
    per_reading = [s.layers_read for s in readings]
    assert all(s.layers_total == LAYERS for s in readings)
    assert min(per_reading) >= 4  # spectrum_min_layers
    assert steps[-1] == max_steps  # the final reading fits, and is taken
    assert spent.spectrum_planned == 10  # every 10% of the run, the last at the last step
    assert spent.spectrum_skipped == spent.spectrum_planned - len(readings)
    if max_steps == 10_000:  # 1,000 s of training leave 5 s: every reading, every layer
        assert steps == list(range(1000, 10_001, 1000))
        assert per_reading == [LAYERS] * 10
    else:  # 10 s leave 50 ms, 22 of them for the spectrum: fewer readings, fewer layers
        assert len(readings) < 10 and layers_read < 10 * LAYERS


def test_a_run_too_short_for_a_reading_never_starts_the_spectrum_up(
    tmp_path: Path, clock: FakeClock, base_reads: list[str]
) -> None:
    """20 steps of 0.1 s allow 10 ms, of which the hooks leave 2.6 ms at the end: less than the
    prior cost of the spectrum's start-up on a CPU (over 10 ms). No base norm is read, no layer
    read or timed: the doctor's time is its hooks' alone."""
    run = _drive(tmp_path, clock, 20, 10)
    spent = run.facts.overhead
    assert spent is not None
    assert run.facts.spectrum == [] and base_reads == []
    assert spent.spectrum_planned == spent.spectrum_skipped == 10
    assert spent.spectrum_layer_seconds is None
    hooks = (
        HOOK_COST["train_begin"]
        + 20 * (HOOK_COST["pre_optimizer_step"] + HOOK_COST["step_end"])
        + 2 * HOOK_COST["log"]
    )
    assert spent.doctor_seconds == pytest.approx(hooks)
    assert spent.doctor_seconds <= SHARE * spent.wall_seconds


def test_a_later_run_in_the_process_leaves_the_library_load_out(
    tmp_path: Path, clock: FakeClock, base_reads: list[str]
) -> None:
    """The start-up's prior on a CPU: 10 ms of library load, 0.16 ms for the 81,920 base-weight
    elements, 2 ms for the warm-up and timed layer. A fresh process waits until the load fits too
    (its first reading at step 60); once a spectrum was read in the process the load is left out,
    and a 100-step run reads as it did with the start-up in train_begin (5 layers at step 40)."""
    readings = []
    for _ in range(2):
        run = _drive(tmp_path, clock, 100, 10)
        readings.append([(s.step, s.layers_read) for s in run.facts.spectrum])
    assert readings == [[(60, 7), (100, 13)], [(40, 5), (100, 14)]]
    assert len(base_reads) == 2 * LAYERS


def test_subsets_rotate_over_every_layer(tmp_path: Path, clock: FakeClock) -> None:
    """400 steps leave room for 10 of 14 layers per reading: each layer is read in turn."""
    run = _drive(tmp_path, clock, 400, 10)
    partial = [names for names in run.names if len(names) < LAYERS]
    assert len(partial) >= 3
    assert len({name for names in partial for name in names}) == LAYERS


def test_no_limit_reads_every_planned_reading(
    tmp_path: Path, clock: FakeClock, base_reads: list[str]
) -> None:
    run = _drive(tmp_path, clock, 20, 10, time_budget=None)  # too short for a limited budget
    assert len(base_reads) == LAYERS
    assert [s.step for s in run.facts.spectrum] == list(range(2, 21, 2))
    assert all(s.layers_read == LAYERS for s in run.facts.spectrum)
    run = _drive(tmp_path, clock, 100, 10, time_budget=None)
    assert [s.step for s in run.facts.spectrum] == list(range(10, 101, 10))
    assert all(s.layers_read == LAYERS for s in run.facts.spectrum)
    assert run.facts.overhead is not None
    assert run.facts.overhead.time_budget is None and run.facts.overhead.spectrum_skipped == 0


def _drive_loop(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, max_steps: int, **config: Any
) -> RunFacts:
    """A custom loop of ``max_steps`` steps of ``STEP`` seconds with a LoopDoctor, logging every
    10 steps; the probes' work in each hook costs ``HOOK_COST`` as in :func:`_drive`."""
    from lora_doctor.integrations import loop as loop_module

    call = loop_module.call_probes

    def costly_call(probes: Any, hook: str, event: Event, *args: Any) -> None:
        clock.advance(HOOK_COST.get(hook, 0.0))
        call(probes, hook, event, *args)

    monkeypatch.setattr(loop_module, "call_probes", costly_call)
    model = _all_linear_peft()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    doctor = loop_module.LoopDoctor(
        model, optimizer, max_steps=max_steps, config=DoctorConfig(spectrum_min_layers=4, **config)
    )
    with doctor:
        for step in range(1, max_steps + 1):
            clock.advance(STEP)
            doctor.on_before_optimizer_step()
            doctor.on_train_batch_end({"loss": 2.0, "grad_norm": 1.0} if step % 10 == 0 else None)
    return doctor.doctor.facts


def test_a_custom_loop_keeps_the_budget_too(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop doctor (one process) charges its hooks to the same budget and its readings adapt:
    100 steps of 0.1 s keep within 0.5% with fewer readings and layers, where no limit reads
    every layer at every planned reading."""
    facts = _drive_loop(clock, monkeypatch, 100)
    spent = facts.overhead
    assert spent is not None and spent.time_budget == SHARE
    hooks = (
        HOOK_COST["train_begin"]
        + 100 * (HOOK_COST["pre_optimizer_step"] + HOOK_COST["step_end"])
        + 10 * HOOK_COST["log"]
    )
    assert spent.doctor_seconds >= hooks  # every hook is charged
    assert spent.doctor_seconds <= SHARE * spent.wall_seconds
    layers_read = sum(s.layers_read for s in facts.spectrum)
    assert 0 < layers_read < 10 * LAYERS and spent.spectrum_skipped > 0
    unlimited = _drive_loop(clock, monkeypatch, 100, time_budget=None).spectrum
    assert [s.layers_read for s in unlimited] == [LAYERS] * 10


def test_a_custom_loop_of_several_processes_reads_in_full(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several processes the loop doctor has no exchange to agree on what to skip: no
    budget, every planned reading in full, and nothing breaks on the way."""
    from lora_doctor.probes import dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    facts = _drive_loop(clock, monkeypatch, 100)
    assert facts.overhead is None and facts.world_size == 2
    assert [s.layers_read for s in facts.spectrum] == [LAYERS] * 10


def test_ranks_decide_alike_from_the_exchanged_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks whose clocks differ (rank 1 steps 10% slower and reads twice as slowly) take
    the same readings of the same layers at the same steps: a reading gathers parameters under
    ZeRO-3 and FSDP, a collective call every rank must make alike."""
    monkeypatch.setattr(spectrum_module, "world_size", lambda: 2)
    monkeypatch.setattr(spectrum_module, "_LOADED", set())
    clocks = [FakeClock(), FakeClock()]
    current = [0, 0]  # the rank and step of the hook running
    started: list[tuple[int, int]] = []  # (rank, step) of each base-norm read
    base_norm = spectrum_module._base_norm

    def noted(base: Any) -> Any:
        started.append((current[0], current[1]))
        return base_norm(base)

    monkeypatch.setattr(spectrum_module, "_base_norm", noted)
    read = spectrum_module.lowrank_singular_values

    def costly(*args: Any, **kwargs: Any) -> torch.Tensor:
        clocks[current[0]].advance(LAYER * (1 + current[0]))
        return read(*args, **kwargs)

    monkeypatch.setattr(spectrum_module, "lowrank_singular_values", costly)
    model = _all_linear_peft()
    config = DoctorConfig(spectrum_min_layers=4)
    ranks = [RankReadings(), RankReadings()]
    budgets = [TimeBudget(SHARE, first_steps=2, clock=c) for c in clocks]
    doctors = [Doctor(config, emit=False) for _ in ranks]
    probes = [SpectrumProbe(config) for _ in budgets]
    names: list[list[list[str]]] = [[], []]

    def hook(r: int, step: int, name: str) -> None:
        """Rank ``r``'s probe hook, charged to its budget as the callback does."""
        current[:] = [r, step]
        since = budgets[r].start if name == "train_begin" else clocks[r]()
        state = TrainerState(max_steps=400, global_step=step)
        event = Event(
            doctor=doctors[r],
            args=None,
            state=state,
            model=model,
            ranks=ranks[r],
            budget=budgets[r],
        )
        readings = len(doctors[r].facts.spectrum)
        getattr(probes[r], name)(event)
        budgets[r].charge(since, step)
        if len(doctors[r].facts.spectrum) > readings:
            names[r].append([lay.name for lay in doctors[r].facts.spectrum[-1].layers])

    for r in (0, 1):
        hook(r, 0, "train_begin")
    for step in range(1, 401):
        for r in (0, 1):
            clocks[r].advance(STEP * (1 + r / 10))
            hook(r, step, "step_end")
        if step % 20 == 0:  # the exchange at each log: every rank holds the same spread after it
            for r in (0, 1):
                budgets[r].put(ranks[r], step)
            local = [rk.exchange() for rk in ranks]
            merged = {
                k: RankSpread(min(s[k].min for s in local), max(s[k].max for s in local))
                for k in local[0]
            }
            for rk in ranks:
                rk.spread = merged
    for r in (0, 1):
        hook(r, 400, "train_end")
    got = [[(s.step, s.layers_read) for s in d.facts.spectrum] for d in doctors]
    assert got[0] == got[1] and names[0] == names[1]
    assert len(got[0]) >= 2 and any(n < LAYERS for _, n in got[0])
    # the deferred start-up (its base-norm reads gather under ZeRO-3) at one step on both ranks
    steps = {step for _, step in started}
    assert len(steps) == 1 and 0 < steps.pop() == got[0][0][0]
    assert sorted(r for r, _ in started) == [0] * LAYERS + [1] * LAYERS


def test_config_validates_the_budget() -> None:
    assert DoctorConfig(time_budget=None).time_budget is None
    for bad in (0, -0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"time_budget must be None or a number in \(0, 1\]"):
            DoctorConfig(time_budget=bad)


@pytest.mark.slow
def test_a_real_run_records_what_the_doctor_spent(tmp_path: Path) -> None:
    """On a real Trainer the diagnosis says what the doctor spent against the wall time, and how
    many readings were planned, skipped and taken. This tiny model's steps take milliseconds: the
    doctor's fixed costs overrun the budget, so the spectrum's start-up is never paid and no layer
    is read or timed (its part is the start of train_begin's: the layers, B's peaks, the tokens)."""
    from tiny import Rows, tiny_args, tiny_peft
    from transformers import Trainer

    callback = LoraDoctorCallback()
    trainer = Trainer(
        model=tiny_peft(),
        args=tiny_args(tmp_path, max_steps=10),
        train_dataset=Rows(),
        callbacks=[callback],
    )
    trainer.train()
    run = json.loads((tmp_path / "lora_doctor.json").read_text())["run"]
    spent = run["overhead"]
    assert spent["time_budget"] == SHARE
    assert 0 < spent["spectrum_seconds"] < spent["doctor_seconds"] < spent["wall_seconds"]
    assert spent["doctor_seconds"] > SHARE * spent["wall_seconds"]
    assert spent["spectrum_layer_seconds"] is None and run["spectrum"] == []
    assert spent["spectrum_planned"] == spent["spectrum_skipped"] == 10
