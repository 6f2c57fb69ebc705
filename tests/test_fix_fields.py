"""Every ``config_changes`` the doctor can produce names a real field of peft's ``LoraConfig`` or
transformers' ``TrainingArguments``, with a value of the field's type (DESIGN.md, "A fix must work").

The changes are collected by running the code that makes them, not by reading the source: each
check that recommends a change runs on data that makes it fire, each candidate cause is judged on
representative looks, each crash fact check on a crash it explains, while every ``Recommendation``
made is recorded with the function that made it. The source is read only to list those functions
(every call that passes ``config_changes=``), so that a new one without a case here fails.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_doctor.checks import Context, Phase
from lora_doctor.checks.memory import KEY_CAPACITY, KEY_HEADROOM, KEY_PEAK_ALLOC
from lora_doctor.checks.rank import RankUnderused, summarise
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import CANDIDATES, Findings, Look, rollback
from lora_doctor.diagnosis.crashes import classify
from lora_doctor.engine import Doctor
from lora_doctor.facts import (
    AdapterFacts,
    Crash,
    CrashFacts,
    LayerSpectrum,
    MemoryFacts,
    RunFacts,
    SetupFacts,
    SpectrumSnapshot,
)
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.fix import KNOWN_FIELDS, LORA_CONFIG, RENAMED, apply_findings, fits
from lora_doctor.history import History

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_doctor"

#: Functions that pass ``config_changes=`` without making a change of their own.
NOT_SOURCES = {
    "lora_doctor/findings.py:Recommendation.from_dict": "reads a saved recommendation back",
    "lora_doctor/diagnosis/reasoning.py:_merge": "merges the symptom's and the cause's changes",
    "lora_doctor/diagnosis/reasoning.py:_rule_out": "keeps the symptom's own changes",
}


# --- the functions that make config changes, from the source ---------------------------------------
def change_sites() -> set[str]:
    """``path:qualname`` of every function in lora_doctor/ with a ``config_changes=`` keyword."""
    sites: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()

        def visit(node: ast.AST, scope: tuple[str, ...], rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                inner = scope
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    inner = (*scope, child.name)
                if isinstance(child, ast.keyword) and child.arg == "config_changes":
                    sites.add(f"{rel}:{'.'.join(scope)}")
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), ())
    return sites


# --- representative inputs ------------------------------------------------------------------------
def _setup_doctor() -> None:
    """One set-up look at an adapter with every set-up mistake that has a config change."""
    adapters = {
        "default": AdapterFacts(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "custom": AdapterFacts(r=8, lora_alpha=16, init_lora_weights=False),
    }
    facts = RunFacts(
        has_lora=True,
        trainer="GRPOTrainer",
        adapters=adapters,
        checkpoint_adapters={"default": AdapterFacts(r=8, lora_alpha=16)},
        resumed_from="out/checkpoint-20",
        lora_params=20_000_000,
        lora_params_by_adapter={"default": 20_000_000},
        base_params=200_000_000,
        vllm_max_lora_rank=8,
        learning_rate=0.5,  # 500x the top of LoRA's range with AdamW
    )
    Doctor(facts=facts, emit=False).run_phase(Phase.SETUP)


def _small_budget() -> None:
    adapter = AdapterFacts(r=1, lora_alpha=2, target_modules=["q_proj", "down_proj"])
    facts = RunFacts(
        has_lora=True,
        adapters={"default": adapter},
        lora_params=1_000,
        lora_params_by_adapter={"default": 1_000},
        base_params=7_000_000_000,
    )
    Doctor(facts=facts, emit=False).run_phase(Phase.SETUP)


def _replay(entries: list[dict[str, float]], **facts: Any) -> None:
    adapters = {"default": AdapterFacts(r=32, lora_alpha=64, lora_dropout=0.0)}
    doctor = Doctor(
        facts=RunFacts(max_steps=len(entries) * 10, adapters=adapters, **facts), emit=False
    )
    doctor.start()
    for i, entry in enumerate(entries, 1):
        doctor.observe(10 * i, entry)
    doctor.end()


def _curves() -> None:
    """Overfit (U-shaped evaluation loss), the same while the run's own metric still improves, a
    zero loss beside a NaN grad norm, a later zero loss."""
    train = [2.0 * 0.9**i for i in range(40)]
    evals = [1.5, 1.2, 1.0, 0.9, 0.95, 1.02, 1.1, 1.2, 1.3, 1.4]
    entries: list[dict[str, float]] = [{"loss": v, "epoch": i / 8} for i, v in enumerate(train)]
    for i, v in enumerate(evals):
        entries[4 * i + 3]["eval_loss"] = v
    _replay(entries, train_examples=200)
    for i in range(len(evals)):
        entries[4 * i + 3]["eval_accuracy"] = 0.5 + 0.04 * i
    _replay(entries, train_examples=200, setup=SetupFacts(metric_for_best_model="accuracy"))
    zero_nan = [{"loss": 1.0 - 0.01 * i, "grad_norm": 1.0} for i in range(20)]
    zero_nan[12] = {"loss": 0.0, "grad_norm": float("nan")}
    _replay(zero_nan, train_examples=200)
    later = [{"loss": 1.0 - 0.01 * i} for i in range(20)]
    later[12] = {"loss": 0.0}
    _replay(later, train_examples=200)


def _memory() -> None:
    """A peak at 97% of the device, and a run that died of out-of-memory."""
    memory = MemoryFacts(
        available=True, per_device_train_batch_size=8, gradient_accumulation_steps=1, r=16
    )
    doctor = Doctor(facts=RunFacts(max_steps=100, memory=memory), emit=False)
    doctor.start()
    doctor.observe(5, {KEY_PEAK_ALLOC: 77.5, KEY_CAPACITY: 80.0, KEY_HEADROOM: 2.0})
    memory.oom = {"step": 6, "where": "training", "error": "CUDA out of memory."}
    doctor.end()


def _rank_underused() -> None:
    """A rank-32 update with 8 values above the noise floor (benchmarks/planted_rank.py's shape)."""
    values = [1.0, 0.93, 0.86, 0.79, 0.71, 0.64, 0.57, 0.5] + [0.04] * 24

    def layers(scale: float) -> list[LayerSpectrum]:
        return [
            LayerSpectrum(
                name=f"layers.0.{k}",
                kind=k,
                r=32,
                singular_values=[scale * v for v in values],
                b_norm=scale,
                relative_update=0.05 * scale,
            )
            for k in ("q_proj", "v_proj")
        ]

    facts = RunFacts(has_lora=True, max_steps=100, lora_params=10_000)
    facts.spectrum = [  # the update grew 4x between the readings: past its first steps
        SpectrumSnapshot(step=s, kinds=summarise(layers(scale), 0.1), layers=layers(scale))
        for s, scale in ((90, 0.25), (100, 1.0))
    ]
    history = History()
    for i, v in enumerate([2.0, 1.6, 1.2, 0.9, 0.6, 0.4, 0.25, 0.15, 0.09, 0.05]):
        history.add(10 * (i + 1), {"loss": v})
    list(RankUnderused().run(Context(facts, history, DoctorConfig(), Phase.END, 100)))


def _looks() -> Iterator[Look]:
    """Each symptom with candidate causes, on facts where the causes with a fix find support."""
    setup = SetupFacts(
        optimizer="adamw_torch",
        max_grad_norm=0.0,
        precision="fp16",
        fp16=True,
        gradient_checkpointing=True,
        module_kinds=["q_proj", "v_proj", "up_proj", "down_proj"],
    )
    for lr in (2e-5, 0.3, 0.0):
        adapter = AdapterFacts(r=16, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
        facts = RunFacts(
            has_lora=True,
            learning_rate=lr,
            adapters={"default": adapter},
            setup=setup,
            lora_params=100,
            trainable_lora_params=100,
            no_grad_layers=["layers.0.q_proj"],
        )
        history = History()
        for step in range(1, 41):
            history.add(step, {"loss": 2.0 - 0.01 * step, "learning_rate": lr})
        for slug in CANDIDATES:
            symptom = Finding("LD000", slug, Severity.WARNING, 40, "t", "m", {"first_step": 30})
            yield Look(symptom, Findings([symptom]), facts, DoctorConfig(), history)


def _causes() -> None:
    for look in _looks():
        for candidate in CANDIDATES[look.symptom.slug]:
            candidate(look)
    rollback(8, 16.0, RunFacts(), DoctorConfig())
    rollback(8, 12.5, RunFacts(), DoctorConfig())


def _crashes() -> None:
    """The crashes whose fixes change the arguments, with the facts that confirm each."""
    reentrant = {"checkpointing": True, "use_reentrant": True, "input_grads": False}
    cases = [
        (RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn"),
         CrashFacts(**reentrant, trainable_params=10)),
        (ValueError("Attempting to unscale FP16 gradients."),
         CrashFacts(trainable_fp16_count=2, trainable_fp16=["w"], bf16_supported=True)),
        (RuntimeError("Expected to mark a variable ready only once."),
         CrashFacts(**reentrant, world_size=2, ddp_find_unused_parameters=True)),
        (RuntimeError("Expected to mark a variable ready only once."),  # transformers 5's names
         CrashFacts(**reentrant, world_size=2, checkpointing_arg="activation_checkpointing")),
        (RuntimeError("expected mat1 and mat2 to have the same dtype, but got: float != c10::BFloat16"),
         CrashFacts(param_dtypes={"float32": 3, "bfloat16": 2})),
        (RuntimeError("expected mat1 and mat2 to have the same dtype, but got: float != c10::Half"),
         CrashFacts(param_dtypes={"float32": 3, "float16": 2})),
    ]  # fmt: skip
    for error, facts in cases:
        classify(Crash.from_exception(error, 2, facts), RunFacts())


CASES: dict[str, Callable[[], None]] = {
    "setup": _setup_doctor,
    "small-budget": _small_budget,
    "curves": _curves,
    "memory": _memory,
    "rank-underused": _rank_underused,
    "causes": _causes,
    "crashes": _crashes,
}


@pytest.fixture(scope="module")
def produced() -> list[tuple[str, dict[str, Any]]]:
    """``(site, config_changes)`` of every recommendation with changes the cases make."""
    seen: list[tuple[str, dict[str, Any]]] = []
    original = Recommendation.__init__

    def record(self: Recommendation, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        code = sys._getframe(1).f_code
        path = Path(code.co_filename).resolve()
        if self.config_changes and path.is_relative_to(PACKAGE):
            site = f"{path.relative_to(ROOT).as_posix()}:{code.co_qualname}"
            seen.append((site, dict(self.config_changes)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Recommendation, "__init__", record)
        for case in CASES.values():
            case()
    return seen


def test_every_change_site_has_a_case(produced: list[tuple[str, dict[str, Any]]]) -> None:
    """A new ``config_changes=`` in lora_doctor/ needs a case in :data:`CASES` (or, when it only
    passes on changes made elsewhere, an entry in :data:`NOT_SOURCES`)."""
    missing = change_sites() - set(NOT_SOURCES) - {site for site, _ in produced}
    assert not missing, f"no case exercises {sorted(missing)}"


def test_every_change_is_a_known_field_of_its_type(
    produced: list[tuple[str, dict[str, Any]]],
) -> None:
    wrong = [
        (site, key, value)
        for site, changes in produced
        for key, value in changes.items()
        if key not in KNOWN_FIELDS or not fits(value, KNOWN_FIELDS[key][1])
    ]
    assert not wrong, wrong


def test_every_known_field_is_produced(produced: list[tuple[str, dict[str, Any]]]) -> None:
    """The routing table holds no field the doctor never sets."""
    used = {key for _, changes in produced for key in changes}
    assert set(KNOWN_FIELDS) <= used, sorted(set(KNOWN_FIELDS) - used)


# --- against the installed peft and transformers ---------------------------------------------------
@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A LoraConfig and the TrainingArguments of a run that evaluates (as an overfit run does)."""
    from peft import LoraConfig
    from transformers import TrainingArguments

    out = tmp_path_factory.mktemp("args")
    args = TrainingArguments(
        output_dir=str(out), eval_strategy="steps", eval_steps=10, report_to="none", use_cpu=True
    )
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), args


SAMPLES = (0, 3, 2.5, True, None, "x", "all-linear", ["q_proj"], {"use_reentrant": False}, 1e-4)


@pytest.mark.parametrize("key", sorted(KNOWN_FIELDS))
def test_known_field_matches_the_installed_class(key: str, real: tuple[Any, Any]) -> None:
    """The field exists where the table routes it, and every value the table accepts the class's
    annotation accepts too."""
    from lora_doctor.fix import _class_fields

    target, hint = KNOWN_FIELDS[key]
    obj = real[0] if target == LORA_CONFIG else real[1]
    fields = _class_fields(obj)
    # a renamed field counts under either name: transformers 5's, or the one before it
    other = RENAMED.get(key) or next((old for old, new in RENAMED.items() if new == key), None)
    name = key if key in fields else other
    assert name in fields, f"{type(obj).__name__} has no field {key}" + (
        f" nor {other}" * bool(other)
    )
    looser = [s for s in SAMPLES if fits(s, hint) and not fits(s, fields[name])]
    assert not looser, f"{key}: the table accepts {looser}, {type(obj).__name__} does not"


def test_the_real_classes_take_every_change(
    produced: list[tuple[str, dict[str, Any]]], real: tuple[Any, Any]
) -> None:
    """Each recommendation's changes, applied alone, build both objects with nothing unrouted."""
    lora, args = real
    for site, changes in produced:
        fix = Recommendation("fix", (), changes)
        finding = Finding("LD000", "x", Severity.WARNING, 1, "t", "m", {}, fix)
        applied = apply_findings([finding], lora, args)
        assert not applied.unrouted, (site, applied.unrouted)
        set_values = sorted(repr(c.value) for c in applied.applied)
        assert set_values == sorted(map(repr, changes.values())), site  # every change kept
