"""Adapter checks on plain facts: where each fires and where it stays quiet (no model needed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_doctor.checks import Phase
from lora_doctor.checks.adapter import is_attention_module
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, LayerFacts, RunFacts
from lora_doctor.findings import Finding, Severity
from lora_doctor.offline import diagnose


def layer(name: str = "model.layers.0.self_attn.q_proj", **kw) -> LayerFacts:
    """A healthy live layer: r 8, alpha 16, 64 -> 64, shapes that fit."""
    base = {
        "name": name,
        "adapter": "default",
        "kind": "linear",
        "r": 8,
        "lora_alpha": 16.0,
        "scaling": 2.0,
        "d_in": 64,
        "d_out": 64,
        "a_shape": (8, 64),
        "b_shape": (64, 8),
    }
    base.update(kw)
    return LayerFacts(**base)


MLP = "model.layers.0.mlp.down_proj"


def live(**kw) -> RunFacts:
    """Healthy live facts (0.5% budget, attention and MLP targets, everything trainable)."""
    facts = RunFacts(
        has_lora=True,
        adapters={
            "default": AdapterFacts(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"])
        },
        layers=[layer(), layer(MLP)],
        lora_params=5_000,
        lora_params_by_adapter={"default": 5_000},
        trainable_lora_params=5_000,
        trainable_params=5_000,
        base_params=1_000_000,
    )
    return replace(facts, **kw)


def offline(**adapter_kw) -> RunFacts:
    """Facts as the offline doctor builds them from adapter_config.json: no layers, no counts."""
    fields = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    fields.update(adapter_kw)
    return RunFacts(has_lora=True, adapters={"default": AdapterFacts(**fields)})


def run(facts: RunFacts, phase: Phase = Phase.SETUP, **cfg) -> list[Finding]:
    doctor = Doctor(DoctorConfig(**cfg), facts, emit=False)
    return doctor.run_phase(phase, step=2)


def slugs(facts: RunFacts, phase: Phase = Phase.SETUP) -> set[str]:
    return {f.slug for f in run(facts, phase)}


CASES = [
    # (facts, phase, slug, fires)
    (live(), Phase.SETUP, "alpha-rank-ratio", False),
    (live(layers=[layer(lora_alpha=8.0, scaling=1.0)]), Phase.SETUP, "alpha-rank-ratio", False),
    (live(layers=[layer(lora_alpha=4.0, scaling=0.5)]), Phase.SETUP, "alpha-rank-ratio", True),
    (live(layers=[layer(lora_alpha=64.0, scaling=8.0)]), Phase.SETUP, "alpha-rank-ratio", True),
    (
        live(layers=[layer(r=16, lora_alpha=8.0, scaling=2.0, use_rslora=True)]),
        Phase.SETUP,
        "alpha-rank-ratio",
        False,
    ),
    (offline(r=16, lora_alpha=8), Phase.SETUP, "alpha-rank-ratio", True),
    (offline(r=16, lora_alpha=16, use_rslora=True), Phase.SETUP, "alpha-rank-ratio", True),
    (
        offline(r=16, lora_alpha=8, init_lora_weights="pissa"),
        Phase.SETUP,
        "alpha-rank-ratio",
        False,
    ),
    (
        offline(rank_pattern={"v_proj": 32}),
        Phase.SETUP,
        "alpha-rank-ratio",
        True,
    ),
    (live(), Phase.SETUP, "lora-param-budget", False),
    (live(lora_params_by_adapter={"default": 50_000}), Phase.SETUP, "lora-param-budget", True),
    (live(lora_params_by_adapter={"default": 100}), Phase.SETUP, "lora-param-budget", True),
    (live(base_params=0), Phase.SETUP, "lora-param-budget", False),
    (offline(), Phase.SETUP, "lora-param-budget", False),
    (live(), Phase.SETUP, "attention-only-targets", False),
    (live(layers=[layer()]), Phase.SETUP, "attention-only-targets", True),
    (offline(target_modules=["q_proj", "v_proj"]), Phase.SETUP, "attention-only-targets", True),
    (offline(target_modules="all-linear"), Phase.SETUP, "attention-only-targets", False),
    (offline(target_modules=["c_proj"]), Phase.SETUP, "attention-only-targets", False),
    (offline(), Phase.SETUP, "custom-init", False),
    (offline(init_lora_weights="pissa_niter_4"), Phase.SETUP, "custom-init", True),
    (offline(init_lora_weights="gaussian"), Phase.SETUP, "custom-init", True),
    (offline(init_lora_weights=False), Phase.SETUP, "custom-init", True),
    (live(), Phase.SETUP, "no-trainable-params", False),
    (live(trainable_lora_params=0), Phase.SETUP, "no-trainable-params", True),
    (offline(), Phase.SETUP, "no-trainable-params", False),
    (live(), Phase.SETUP, "adapter-not-in-optimizer", False),
    (
        live(not_in_optimizer=["model.layers.0.self_attn.q_proj.lora_A.default.weight"]),
        Phase.SETUP,
        "adapter-not-in-optimizer",
        True,
    ),
    (live(), Phase.SETUP, "base-weights-trainable", False),
    (
        live(trainable_base=["lm_head.weight"], trainable_base_params=8192),
        Phase.SETUP,
        "base-weights-trainable",
        True,
    ),
    (live(), Phase.FIRST_STEPS, "adapter-shape", False),
    (
        live(layers=[layer(a_shape=(4, 64), b_shape=(64, 4))]),
        Phase.FIRST_STEPS,
        "adapter-shape",
        True,
    ),
    (
        live(layers=[layer(a_shape=(64, 64), b_shape=(64, 64))]),
        Phase.FIRST_STEPS,
        "adapter-shape",
        True,
    ),
    (
        # GPT-2 Conv1D: base weight stored (in, out), the LoRA pair in the usual orientation.
        live(
            layers=[
                layer(
                    "h.0.attn.c_attn",
                    kind="conv1d",
                    fan_in_fan_out=True,
                    d_out=192,
                    b_shape=(192, 8),
                )
            ]
        ),
        Phase.FIRST_STEPS,
        "adapter-shape",
        False,
    ),
    (live(layers=[layer(use_dora=True)]), Phase.FIRST_STEPS, "adapter-shape", False),
    (live(layers=[layer(a_shape=None, b_shape=None)]), Phase.FIRST_STEPS, "adapter-shape", False),
    (
        live(layers=[layer(r=64, a_shape=(64, 64), b_shape=(64, 64))]),
        Phase.FIRST_STEPS,
        "adapter-shape",
        True,
    ),
    (live(), Phase.FIRST_STEPS, "adapter-not-learning", False),
    (live(no_grad_layers=[MLP]), Phase.FIRST_STEPS, "adapter-not-learning", True),
    (live(b_still_zero_layers=[MLP]), Phase.FIRST_STEPS, "adapter-not-learning", True),
    (live(frozen_in_place=[MLP]), Phase.FIRST_STEPS, "adapter-not-learning", True),
]
IDS = [
    "alpha-2r-quiet",
    "alpha-r-quiet",
    "alpha-half-fires",
    "alpha-8-fires",
    "rslora-alpha-sqrt-quiet",
    "offline-alpha-half-fires",
    "offline-rslora-4-fires",
    "offline-pissa-quiet",
    "offline-rank-pattern-fires",
    "budget-half-percent-quiet",
    "budget-5-percent-fires",
    "budget-0.01-percent-fires",
    "budget-unknown-base-quiet",
    "budget-offline-quiet",
    "targets-with-mlp-quiet",
    "targets-q-only-fires",
    "offline-targets-qv-fires",
    "offline-all-linear-quiet",
    "offline-ambiguous-c-proj-quiet",
    "init-default-quiet",
    "init-pissa-fires",
    "init-gaussian-fires",
    "init-false-fires",
    "trainable-quiet",
    "nothing-trainable-fires",
    "offline-counts-unknown-quiet",
    "optimizer-complete-quiet",
    "optimizer-missing-lora-fires",
    "base-frozen-quiet",
    "lm-head-trainable-fires",
    "shapes-fit-quiet",
    "rank-mismatch-fires",
    "full-matrix-instead-of-pair-fires",
    "conv1d-fan-in-fan-out-quiet",
    "dora-quiet",
    "shapes-unknown-quiet",
    "full-rank-fires",
    "learning-quiet",
    "no-grad-fires",
    "b-still-zero-fires",
    "frozen-in-place-fires",
]


@pytest.mark.parametrize(("facts", "phase", "slug", "fires"), CASES, ids=IDS)
def test_adapter_check_table(facts: RunFacts, phase: Phase, slug: str, fires: bool) -> None:
    assert (slug in slugs(facts, phase)) is fires


def test_no_lora_model_gets_one_info_and_no_adapter_checks() -> None:
    facts = RunFacts(has_lora=False, trainable_params=100, base_params=100)
    findings = run(facts) + Doctor(DoctorConfig(), facts, emit=False).run_phase(Phase.FIRST_STEPS)
    assert [(f.slug, f.severity) for f in findings] == [("no-lora-adapter", Severity.INFO)]


@pytest.mark.parametrize(
    ("path", "attention"),
    [
        ("model.layers.0.self_attn.q_proj", True),
        ("model.layers.0.self_attn.o_proj", True),
        ("transformer.h.0.attn.c_attn", True),
        ("transformer.h.0.attn.c_proj", True),
        ("transformer.h.0.mlp.c_proj", False),
        ("bert.encoder.layer.0.attention.self.query", True),
        ("bert.encoder.layer.0.attention.output.dense", True),
        ("bert.encoder.layer.0.output.dense", False),
        ("transformer.h.0.self_attention.query_key_value", True),
        ("transformer.blocks.0.attn.Wqkv", True),
        ("encoder.block.0.layer.0.SelfAttention.q", True),
        ("model.layers.0.mlp.gate_proj", False),
        ("lm_head", False),
    ],
    ids=[
        "llama-q",
        "llama-o",
        "gpt2-c-attn",
        "gpt2-attn-c-proj",
        "gpt2-mlp-c-proj",
        "bert-query",
        "bert-attention-output",
        "bert-ffn-output",
        "falcon-qkv",
        "mpt-wqkv",
        "t5-self-attention",
        "llama-gate",
        "lm-head",
    ],
)
def test_attention_recognised_by_path(path: str, attention: bool) -> None:
    assert is_attention_module(path) is attention


def test_alpha_names_odd_layers_when_patterns_differ() -> None:
    facts = live(layers=[layer(), layer(MLP, lora_alpha=4.0, scaling=0.5)])
    (finding,) = [f for f in run(facts) if f.slug == "alpha-rank-ratio"]
    assert finding.evidence["odd_layers"] == [MLP]
    assert "1 of 2 layers" in finding.title
    assert finding.recommendation is not None
    assert finding.recommendation.config_changes == {"lora_alpha": 16}


def test_budget_message_gives_count_share_and_rank() -> None:
    facts = live(lora_params_by_adapter={"default": 50_000})
    (finding,) = [f for f in run(facts) if f.slug == "lora-param-budget"]
    assert "50,000 LoRA parameters, 5% of the base model's 1,000,000" in finding.message
    assert "about 40M" in finding.message
    assert finding.recommendation is not None
    assert finding.recommendation.config_changes == {"r": 1, "lora_alpha": 2}


def test_init_false_is_a_warning_others_info() -> None:
    assert (
        run(offline(init_lora_weights=False), ignore={"alpha-rank-ratio"})[0].severity
        is Severity.WARNING
    )
    (pissa,) = [f for f in run(offline(init_lora_weights="olora")) if f.slug == "custom-init"]
    assert pissa.severity is Severity.INFO
    assert "alpha = r or 2r rule" in pissa.message


def test_not_learning_names_the_frozen_cause() -> None:
    facts = live(trainable_lora_params=0, no_grad_layers=["model.layers.0.self_attn.q_proj", MLP])
    (finding,) = run(facts, Phase.FIRST_STEPS)
    assert finding.title == "2 of 2 LoRA layers are not learning after 2 steps"
    assert "Most likely cause: no LoRA parameter is trainable" in finding.message
    assert finding.recommendation is not None
    assert "is_trainable=True" in finding.recommendation.summary


@pytest.mark.parametrize(
    ("stuck", "severity"),
    [([MLP], Severity.WARNING), (["model.layers.0.self_attn.q_proj", MLP], Severity.ERROR)],
    ids=["some-layers-warning", "all-layers-error"],
)
def test_not_learning_severity_by_share(stuck: list[str], severity: Severity) -> None:
    (finding,) = run(live(no_grad_layers=stuck), Phase.FIRST_STEPS)
    assert finding.severity is severity
    assert ("MoE experts" in finding.message) is (severity is Severity.WARNING)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"peft_type": "LORA", "r": 16, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            {"alpha-rank-ratio", "attention-only-targets"},
        ),
        (
            {
                "peft_type": "LORA",
                "r": 16,
                "lora_alpha": 8,
                "init_lora_weights": "pissa",
                "target_modules": "all-linear",
            },
            {"custom-init"},
        ),
        ({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, set()),
    ],
    ids=["alpha-and-targets", "pissa-no-alpha-verdict", "healthy"],
)
def test_offline_adapter_checks_from_adapter_config(config: dict, expected: set[str]) -> None:
    log = [{"step": s, "loss": 2.0 - 0.01 * s, "learning_rate": 1e-4} for s in range(1, 6)]
    adapter_slugs = {
        f.slug for f in diagnose(log, adapter_config=config).findings if f.code.startswith("LD1")
    }
    assert adapter_slugs == expected


@pytest.mark.parametrize(
    ("base", "lora", "severity"),
    [
        (1_000_000_000, 11_000_000, Severity.INFO),
        (1_000_000_000, 50_000_000, Severity.WARNING),
        (1_000_000_000, 300_000, Severity.INFO),
        (1_000_000_000, 100_000, Severity.WARNING),
        (1_000_000, 300_000, Severity.INFO),
    ],
    ids=["1.1pct-info", "5pct-warning", "0.03pct-info", "0.01pct-warning", "tiny-model-info"],
)
def test_budget_severity_grows_with_distance_on_real_sizes(
    base: int, lora: int, severity: Severity
) -> None:
    facts = live(base_params=base, lora_params=lora, lora_params_by_adapter={"default": lora})
    (finding,) = [f for f in run(facts) if f.slug == "lora-param-budget"]
    assert finding.severity is severity
