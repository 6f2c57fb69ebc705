"""``Diagnosis.apply``: the recommended changes merged, routed, checked and set on copies."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from lora_doctor.cli import main
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.fix import KNOWN_FIELDS, LORA_CONFIG, TRAINING_ARGUMENTS, apply_findings, fits
from lora_doctor.report import Diagnosis


@dataclass
class Lora:
    """Stands in for peft's LoraConfig (the fields the tests use, annotated as peft does)."""

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    use_dora: bool = False


@dataclass
class Args:
    """Stands in for TrainingArguments, with a validation like its ``__post_init__``."""

    output_dir: str = "out"
    learning_rate: float = 5e-5
    max_steps: int = -1
    max_grad_norm: float = 1.0
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("At most one of fp16 and bf16 can be True")


@dataclass
class SftArgs(Args):
    """A subclass with a field of its own, as TRL's SFTConfig is."""

    max_length: int = 1024


def _f(
    slug: str,
    changes: dict[str, Any],
    severity: Severity = Severity.WARNING,
    steps: tuple[str, ...] = (),
    restart: bool = False,
) -> Finding:
    rec = Recommendation(f"fix {slug}", steps, changes, restart)
    return Finding(f"LD{len(slug)}", slug, severity, 10, slug, "m", {}, rec)


# --- routing and types ------------------------------------------------------------------------------
FITS = [
    ("int", 16, int, True),
    ("bool-is-no-int", True, int, False),
    ("int-is-a-float", 2, float, True),
    ("bool-is-no-float", False, float, False),
    ("str-is-no-float", "2e-4", float, False),
    ("list-of-str", ["q_proj", "v_proj"], str | list[str] | None, True),
    ("list-of-int", [1, 2], str | list[str] | None, False),
    ("optional-none", None, bool | None, True),
    ("dict", {"use_reentrant": False}, dict[str, Any] | str | None, True),
    ("literal", "gaussian", bool | Literal["gaussian", "pissa"], True),
    ("literal-other", "eva", bool | Literal["gaussian", "pissa"], False),
    ("tuple-ellipsis", (1, 2), tuple[int, ...], True),
    ("any", object(), Any, True),
]


@pytest.mark.parametrize(
    ("value", "hint", "expected"), [c[1:] for c in FITS], ids=[c[0] for c in FITS]
)
def test_fits(value: Any, hint: Any, expected: bool) -> None:
    assert fits(value, hint) is expected


def test_enum_field_takes_its_values() -> None:
    import enum

    class Strategy(str, enum.Enum):
        BEST = "best"

    assert fits("best", Strategy) and fits(Strategy.BEST, Strategy) and not fits("worst", Strategy)


ROUTES = [
    ("lora-field", {"lora_alpha": 32}, {LORA_CONFIG: {"lora_alpha": 32}}, []),
    ("training-field", {"learning_rate": 2e-4}, {TRAINING_ARGUMENTS: {"learning_rate": 2e-4}}, []),
    ("both", {"r": 16, "max_grad_norm": 1.0}, {LORA_CONFIG: {"r": 16}, TRAINING_ARGUMENTS: {"max_grad_norm": 1.0}}, []),
    ("unknown-field", {"is_trainable": True}, {}, ["is_trainable"]),
    ("wrong-type", {"learning_rate": "2e-4"}, {}, ["learning_rate"]),
    ("bool-for-int", {"r": True}, {}, ["r"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "applied", "unrouted"), [c[1:] for c in ROUTES], ids=[c[0] for c in ROUTES]
)
def test_routing(changes: dict, applied: dict, unrouted: list[str]) -> None:
    fix = apply_findings([_f("x", changes)], Lora(), Args())
    got: dict[str, dict[str, Any]] = {}
    for c in fix.applied:
        got.setdefault(c.target, {})[c.field] = c.value
    assert got == applied
    assert [s.change.field for s in fix.unrouted] == unrouted
    for target, values in applied.items():
        obj = fix.lora_config if target == LORA_CONFIG else fix.training_args
        assert {k: getattr(obj, k) for k in values} == values


def test_unrouted_says_why() -> None:
    fix = apply_findings([_f("x", {"is_trainable": True, "learning_rate": "2e-4"})], Lora(), Args())
    reasons = {s.change.field: s.reason for s in fix.unrouted}
    assert reasons["is_trainable"] == "no field of LoraConfig or TrainingArguments"
    assert reasons["learning_rate"] == "str where TrainingArguments wants float"


def test_a_subclass_brings_its_own_fields() -> None:
    fix = apply_findings([_f("x", {"max_length": 512})], None, SftArgs())
    assert fix.training_args.max_length == 512 and not fix.unrouted


def test_a_field_the_installed_class_lacks_is_not_applied() -> None:
    """A release without the field (a renamed or newer one) gets nothing silently."""
    fix = apply_findings([_f("x", {"save_strategy": "best"})], None, Args())
    assert [s.reason for s in fix.unrouted] == ["no field of this Args"]


@dataclass
class Args5:
    """transformers 5's TrainingArguments: ``gradient_checkpointing`` mirrors
    ``activation_checkpointing``, so the old name set on a copy is reset from the new one."""

    activation_checkpointing: bool | None = None
    gradient_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        if self.activation_checkpointing is None:
            self.activation_checkpointing = bool(self.gradient_checkpointing)
        self.gradient_checkpointing = self.activation_checkpointing


@dataclass
class Args4:
    """An older TrainingArguments: only the old name."""

    gradient_checkpointing: bool = False


@pytest.mark.parametrize(
    ("args", "key", "field_set"),
    [
        (Args5(), "gradient_checkpointing", "activation_checkpointing"),
        (Args5(), "activation_checkpointing", "activation_checkpointing"),
        (Args4(), "activation_checkpointing", "gradient_checkpointing"),
        (Args4(), "gradient_checkpointing", "gradient_checkpointing"),
    ],
    ids=["old-name-new-class", "new-name-new-class", "new-name-old-class", "old-name-old-class"],
)
def test_renamed_fields_are_set_under_the_name_that_counts(
    args: Any, key: str, field_set: str
) -> None:
    fix = apply_findings([_f("x", {key: True})], None, args)
    assert [c.field for c in fix.applied] == [field_set] and not fix.unrouted
    assert fix.training_args.gradient_checkpointing is True


def test_a_change_the_class_does_not_keep_is_reported() -> None:
    """Had the old name been set on transformers 5's class, the copy would read False: such a
    change is reported, not claimed."""

    @dataclass
    class Mirror:
        flag: bool = False

        def __post_init__(self) -> None:
            self.flag = False  # resets whatever it was given, as a mirror field does

    fix = apply_findings([_f("x", {"flag": True})], None, Mirror())
    assert fix.applied == () and fix.changes == ()
    assert [s.reason for s in fix.unrouted] == [
        "Mirror did not keep it: it reads False after the copy"
    ]


def test_without_objects_the_known_fields_route() -> None:
    """The CLI's case: nothing to apply to, the changes routed by the doctor's own table."""
    fix = apply_findings([_f("x", {"lora_alpha": 32, "learning_rate": 2e-4, "nope": 1})])
    assert fix.config_changes() == {
        LORA_CONFIG: {"lora_alpha": 32},
        TRAINING_ARGUMENTS: {"learning_rate": 2e-4},
    }
    assert fix.applied == () and fix.lora_config is None and fix.training_args is None
    assert [s.change.field for s in fix.unrouted] == ["nope"]
    assert "(no LoraConfig given: set it yourself)" in fix.summary()


def test_wrong_type_checked_against_the_known_fields_without_objects() -> None:
    fix = apply_findings([_f("x", {"r": 8.5})])
    assert [s.reason for s in fix.unrouted] == ["float where LoraConfig wants int"]


def test_known_fields_route_to_the_two_classes() -> None:
    assert {t for t, _ in KNOWN_FIELDS.values()} == {LORA_CONFIG, TRAINING_ARGUMENTS}


# --- merging -----------------------------------------------------------------------------------------
def test_errors_before_warnings_and_the_loser_dropped_whole() -> None:
    """The warning comes first but the error wins its field; the warning's other change, meant
    with the one that lost, is dropped too, and the result names the winner."""
    warning = _f("loss-plateau", {"r": 16, "lora_alpha": 32})
    error = _f("loss-divergence", {"lora_alpha": 16}, Severity.ERROR)
    fix = apply_findings([warning, error], Lora(), Args())
    assert fix.lora_config.lora_alpha == 16 and fix.lora_config.r == 8
    assert [c.slug for c in fix.applied] == ["loss-divergence"]
    assert [s.change.field for s in fix.dropped] == ["r", "lora_alpha"]
    assert all("LD15 loss-divergence (error) sets lora_alpha=16" in s.reason for s in fix.dropped)


def test_first_found_wins_at_equal_severity() -> None:
    first = _f("alpha-rank-ratio", {"lora_alpha": 32})
    second = _f("loss-plateau", {"lora_alpha": 64, "r": 32})
    fix = apply_findings([first, second], Lora(), None)
    assert (fix.lora_config.r, fix.lora_config.lora_alpha) == (8, 32)
    assert {s.change.slug for s in fix.dropped} == {"loss-plateau"}


def test_a_finding_judged_on_the_run_wins_over_one_made_at_set_up() -> None:
    """At equal severity, a symptom's rate read from where the run learned best wins over the
    usual rate that learning-rate-too-high could only give before training; severity still
    comes first."""
    set_up = dataclasses.replace(
        _f("learning-rate-too-high", {"learning_rate": 4.6e-4}, Severity.ERROR), step=None
    )
    symptom = _f("loss-at-chance", {"learning_rate": 2.3e-3}, Severity.ERROR)
    fix = apply_findings([set_up, symptom], None, Args())
    assert fix.training_args.learning_rate == 2.3e-3
    assert [(s.change.slug, s.change.value) for s in fix.dropped] == [
        ("learning-rate-too-high", 4.6e-4)
    ]
    warning = _f("loss-plateau", {"learning_rate": 2.3e-3})
    fix = apply_findings([set_up, warning], None, Args())
    assert fix.training_args.learning_rate == 4.6e-4  # the error wins


def test_a_symptom_of_a_set_up_finding_ranks_with_its_severity() -> None:
    """A warning whose most likely cause is the set-up error learning-rate-too-high is that
    error seen with more of the run: its rate, read from where the run learned best, wins."""
    set_up = dataclasses.replace(
        _f("learning-rate-too-high", {"learning_rate": 4.6e-4}, Severity.ERROR), step=None
    )
    causes = [{"cause": "learning-rate-too-high", "verdict": "supported"}]
    symptom = dataclasses.replace(
        _f("loss-at-chance", {"learning_rate": 2e-3}), evidence={"causes": causes}
    )
    fix = apply_findings([set_up, symptom], None, Args())
    assert fix.training_args.learning_rate == 2e-3
    open_cause = dataclasses.replace(
        symptom, evidence={"causes": [{**causes[0], "verdict": "open"}]}
    )
    fix = apply_findings([set_up, open_cause], None, Args())
    assert fix.training_args.learning_rate == 4.6e-4  # no cause named: the error wins


def test_a_suggestion_is_never_lifted_above_the_fixes() -> None:
    """An information finding whose top cause is a set-up error stays a suggestion: followed
    after the fixes, it loses the conflict."""
    set_up = dataclasses.replace(
        _f("learning-rate-too-high", {"learning_rate": 4.6e-4}, Severity.ERROR), step=None
    )
    causes = [{"cause": "learning-rate-too-high", "verdict": "supported"}]
    info = dataclasses.replace(
        _f("my-info", {"learning_rate": 1e-3}, Severity.INFO), evidence={"causes": causes}
    )
    fix = apply_findings([set_up, info], None, Args(), suggestions=True)
    assert fix.training_args.learning_rate == 4.6e-4


def test_the_same_value_twice_is_no_conflict() -> None:
    a = _f("alpha-rank-ratio", {"lora_alpha": 32})
    b = _f("loss-plateau", {"lora_alpha": 32, "learning_rate": 2e-4})
    fix = apply_findings([a, b], Lora(), Args())
    assert not fix.dropped
    assert [(c.field, c.slug) for c in fix.changes] == [
        ("lora_alpha", "alpha-rank-ratio"),
        ("learning_rate", "loss-plateau"),
    ]


@pytest.mark.parametrize("overfit_first", [True, False], ids=["overfit-first", "rate-first"])
def test_a_step_count_does_not_outlive_a_new_learning_rate(overfit_first: bool) -> None:
    """The overfit fix's max_steps (the step of the best evaluation) was measured at the run's
    rate: with another finding lowering the rate it is dropped, the rest of its fix kept."""
    overfit = _f(
        "overfit",
        {"max_steps": 10, "lora_dropout": 0.1},
        steps=("Keep the best checkpoint", "Train fewer steps: max_steps=10 (the best evaluation)"),
    )
    rate = _f("learning-rate-too-high", {"learning_rate": 2e-4})
    found = [overfit, rate] if overfit_first else [rate, overfit]
    fix = apply_findings(found, Lora(), Args())
    assert fix.training_args.learning_rate == 2e-4 and fix.training_args.max_steps == -1
    assert fix.lora_config.lora_dropout == 0.1
    (skipped,) = fix.dropped
    assert skipped.change.field == "max_steps"
    assert "learning-rate-too-high sets learning_rate=0.0002" in skipped.reason
    assert fix.steps == ("Keep the best checkpoint",)  # the step count's own step goes with it
    # one finding that sets both meant them together: kept
    both = apply_findings([_f("overfit", {"max_steps": 10, "learning_rate": 1e-4})], Lora(), Args())
    assert (both.training_args.max_steps, both.dropped) == (10, ())


def test_information_is_not_applied() -> None:
    info = _f("rank-underused", {"r": 4}, Severity.INFO)
    fix = apply_findings([info], Lora(), Args())
    assert fix.applied == () and fix.lora_config == Lora()
    assert [s.reason for s in fix.dropped] == [
        "information only: a suggestion, not a fix (apply with suggestions=True, or --suggestions)"
    ]


def test_suggestions_are_applied_when_asked_after_the_fixes() -> None:
    """With suggestions=True an information finding's changes apply too, but never over a
    warning's: the fix ranks first."""
    targets = _f("attention-only-targets", {"target_modules": "all-linear"}, Severity.INFO)
    smaller = _f("rank-underused", {"r": 4}, Severity.INFO)
    alpha = _f("alpha-rank-ratio", {"lora_alpha": 16, "r": 8})
    fix = apply_findings([targets, smaller, alpha], Lora(), Args(), suggestions=True)
    assert fix.lora_config.target_modules == "all-linear"
    assert (fix.lora_config.r, fix.lora_config.lora_alpha) == (8, 16)
    assert [(s.change.slug, s.change.field) for s in fix.dropped] == [("rank-underused", "r")]
    assert "alpha-rank-ratio (warning) sets r=8" in fix.dropped[0].reason


@pytest.mark.parametrize(
    ("suggestions", "applied"),
    [
        ("attention-only-targets", ["target_modules"]),  # one name, not its letters
        ({"LD22"}, ["target_modules"]),  # by code (here LD + the length of the slug)
        (["rank-underused"], ["r"]),
        (set(), []),
        ("my-own-check", []),  # a finding of the user's own check: present, so known
    ],
    ids=["one-string", "a-code", "a-list", "none-named", "own-check"],
)
def test_suggestions_by_name(suggestions: Any, applied: list[str]) -> None:
    targets = _f("attention-only-targets", {"target_modules": "all-linear"}, Severity.INFO)
    smaller = _f("rank-underused", {"r": 4}, Severity.INFO)
    own = _f("my-own-check", {}, Severity.INFO)
    fix = apply_findings([targets, smaller, own], Lora(), Args(), suggestions=suggestions)
    assert [c.field for c in fix.applied] == applied


@pytest.mark.parametrize(("suggestions", "applied"), [(None, 0), (True, 1), (False, 0)])
def test_suggestions_as_a_switch(suggestions: Any, applied: int) -> None:
    info = _f("attention-only-targets", {"target_modules": "all-linear"}, Severity.INFO)
    assert len(apply_findings([info], Lora(), Args(), suggestions=suggestions).applied) == applied


def test_suggestions_of_another_type_are_one_clear_error() -> None:
    info = _f("attention-only-targets", {"target_modules": "all-linear"}, Severity.INFO)
    with pytest.raises(TypeError, match=r"suggestions=\.\.\.\) takes True or False.*got 1"):
        apply_findings([info], Lora(), Args(), suggestions=1)  # type: ignore[arg-type]


def test_an_unknown_suggestion_name_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'attention-only-targets'"):
        apply_findings([], Lora(), Args(), suggestions={"attention-only-target"})


def test_changes_the_class_refuses_are_reported_and_the_rest_kept() -> None:
    """The class validates each finding's changes: fp16 on top of an earlier bf16 is refused."""
    bf16 = _f("non-finite-values", {"bf16": True}, Severity.ERROR)
    both = _f("training-died", {"fp16": True, "max_grad_norm": 0.5})
    fix = apply_findings([bf16, both], None, Args())
    assert fix.training_args.bf16 is True and fix.training_args.max_grad_norm == 1.0
    assert [c.field for c in fix.applied] == ["bf16"]
    assert [s.change.field for s in fix.unrouted] == ["fp16", "max_grad_norm"]
    assert fix.unrouted[0].reason.startswith("Args refused it: ValueError: At most one of fp16")
    assert [c.field for c in fix.changes] == ["bf16"]


def test_the_objects_passed_in_are_not_modified() -> None:
    lora, args = Lora(target_modules=["q_proj"]), Args(report_to=["tensorboard"])
    before = (dataclasses.replace(lora), dataclasses.replace(args))
    fix = apply_findings([_f("x", {"lora_alpha": 32, "learning_rate": 2e-4})], lora, args)
    assert (lora, args) == before
    assert fix.lora_config is not lora and fix.training_args is not args


def test_nothing_to_apply_gives_equal_copies() -> None:
    lora, args = Lora(), Args()
    fix = apply_findings([], lora, args)
    assert fix.lora_config == lora and fix.lora_config is not lora and fix.training_args == args
    assert fix.summary() == "lora-doctor fix: no configuration change."


@pytest.mark.parametrize("bad", [{"r": 8}, Lora], ids=["dict", "class"])
def test_not_a_dataclass_instance_is_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="LoraConfig must be a dataclass instance"):
        apply_findings([], bad)


# --- steps -------------------------------------------------------------------------------------------
def test_steps_keep_what_configuration_cannot_do() -> None:
    alpha = _f(
        "alpha-rank-ratio",
        {"lora_alpha": 32},
        steps=("Set lora_alpha=32 in LoraConfig", "Restart from scratch"),
        restart=True,
    )
    data = _f("zero-loss", {}, steps=("Print one batch: check that labels are not all -100",))
    lost = _f("loss-plateau", {"lora_alpha": 64}, steps=("Set lora_alpha=64", "Reload the base"))
    unknown = _f("x", {"is_trainable": True}, steps=("Set is_trainable=True when loading",))
    fix = apply_findings([alpha, data, lost, unknown], Lora(), None)
    assert fix.steps == (
        "Restart from scratch",
        "Print one batch: check that labels are not all -100",
        "Set is_trainable=True when loading",  # not applied: the step stays
    )
    assert fix.restart_from_scratch


def test_summary_names_changes_drops_and_steps() -> None:
    fix = apply_findings(
        [
            _f("loss-divergence", {"learning_rate": 2e-4}, Severity.ERROR, ("Restart",), True),
            _f("loss-plateau", {"learning_rate": 1e-3, "r": 16}),
            _f("x", {"nope": 1}),
        ],
        Lora(),
        Args(),
    )
    text = fix.summary()
    assert (
        text.splitlines()[0]
        == "lora-doctor fix: 1 configuration change(s), then restart from step 0:"
    )
    assert "TrainingArguments.learning_rate=0.0002  [LD15 loss-divergence]" in text
    assert "Dropped:\n  learning_rate=0.001 [LD12 loss-plateau]: LD15 loss-divergence" in text
    assert "Not applied:\n  nope=1 [LD1 x]: no field of" in text
    assert text.endswith("Also:\n  1. Restart")


# --- Diagnosis.apply and the command line -----------------------------------------------------------
def test_diagnosis_apply_is_apply_findings() -> None:
    findings = [_f("alpha-rank-ratio", {"lora_alpha": 32})]
    via = Diagnosis(findings=findings).apply(Lora(r=16, lora_alpha=8))
    assert via == apply_findings(findings, Lora(r=16, lora_alpha=8))
    assert via.lora_config == Lora(r=16, lora_alpha=32)


def test_a_saved_diagnosis_applies_as_the_live_one() -> None:
    d = Diagnosis(
        findings=[_f("x", {"target_modules": ["q_proj", "up_proj"], "lora_dropout": 0.1})]
    )
    back = Diagnosis.from_dict(json.loads(d.to_json()))
    assert back.apply(Lora()).lora_config == d.apply(Lora()).lora_config


def _run_dir(tmp_path: Any) -> Any:
    """A saved run with r 16, lora_alpha 8 and a learning rate of 2e-5 that never falls."""
    run = tmp_path / "run"
    run.mkdir()
    log = [
        {"step": s, "loss": 2.0 + 0.001 * (s % 3), "learning_rate": 2e-5} for s in range(5, 401, 5)
    ]
    state = {"global_step": 400, "max_steps": 400, "log_history": log}
    (run / "trainer_state.json").write_text(json.dumps(state))
    adapter = {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
    }
    (run / "adapter_config.json").write_text(json.dumps(adapter))
    return run


def test_cli_fix_json_writes_the_merged_changes_and_steps(tmp_path: Any, capsys: Any) -> None:
    out = tmp_path / "fix.json"
    status = main(["diagnose", str(_run_dir(tmp_path)), "--fix-json", str(out)])
    assert status == 0
    assert f"fix written to {out}" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["schema_version"] == 1
    assert written["config_changes"][LORA_CONFIG]["lora_alpha"] == 32
    assert set(written["config_changes"]) <= {LORA_CONFIG, TRAINING_ARGUMENTS}
    assert all(c["slug"] and c["severity"] in ("warning", "error") for c in written["changes"])
    assert written["unrouted"] == []
    assert all(not s.startswith("Set lora_alpha") for s in written["steps"])


@pytest.mark.parametrize(
    ("flags", "targets"),
    [([], None), (["--suggestions"], "all-linear"), (["--suggest", "LD112"], "all-linear")],
    ids=["fixes-only", "every-suggestion", "one-named"],
)
def test_cli_fix_json_follows_suggestions_when_asked(
    tmp_path: Any, flags: list[str], targets: str | None
) -> None:
    out = tmp_path / "fix.json"
    assert main(["diagnose", str(_run_dir(tmp_path)), "--fix-json", str(out), *flags]) == 0
    written = json.loads(out.read_text())
    assert written["config_changes"][LORA_CONFIG].get("target_modules") == targets


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--suggestions"], "--suggestions says what --fix-json applies: add --fix-json FILE"),
        (["--suggest", "LD112"], "--suggest says what --fix-json applies: add --fix-json FILE"),
        (
            ["--fix-json", "FIX", "--suggest", "atention-only-targets"],
            "--suggest has unknown finding names ['atention-only-targets']: did you mean "
            "'attention-only-targets'",
        ),
        (
            ["--fix-json", "RUN/adapter_config.json"],
            "adapter_config.json is a file this run is read from: write it elsewhere",
        ),
        (
            ["--json", "RUN/trainer_state.json"],
            "trainer_state.json is a file this run is read from: write it elsewhere",
        ),
    ],
    ids=[
        "without-fix-json",
        "suggest-without-fix-json",
        "unknown-slug",
        "over-the-adapter",
        "over-the-state",
    ],
)
def test_cli_suggestions_misuse_is_one_line(
    tmp_path: Any, capsys: Any, flags: list[str], message: str
) -> None:
    run = _run_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    flags = [
        str(tmp_path / "fix.json") if f == "FIX" else f.replace("RUN", str(run)) for f in flags
    ]
    assert main(["diagnose", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "fix.json").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the run's files untouched


def test_cli_fix_json_to_a_folder_is_one_line_and_exit_2(tmp_path: Any, capsys: Any) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    status = main(["diagnose", str(_run_dir(tmp_path)), "--fix-json", str(folder)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("lora-doctor: error: cannot write")
