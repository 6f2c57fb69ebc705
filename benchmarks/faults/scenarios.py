"""The benchmark's runs: healthy controls and runs with one real training mistake each.

Every fault is a mistake people make when fine-tuning with LoRA, made here in a real training run
(a real ``transformers.Trainer`` on a tiny model, real gradients, real checkpoints); nothing is a
made-up log. Each healthy control is the same set-up with the mistake fixed, so a finding on a
control is a false alarm.

``must`` lists the findings a run has to produce: each entry is a slug, or alternatives joined by
``|`` when either names the fault correctly (a diverging run may show the divergence or the NaN it
ends in). ``must_not`` lists findings that would be wrong diagnoses of the fault; on a healthy
control every finding at warning or above is a false alarm (``ANY``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, TrainerCallback

from benchmarks import planted_rank
from benchmarks.faults import tasks
from benchmarks.faults.runner import Outcome, Spec, lora_config, train
from benchmarks.faults.score import ANY

__all__ = ["ANY", "SCENARIOS", "Scenario", "Skip"]


class Skip(Exception):
    """A run that cannot run here (e.g. needs a GPU); the message says why."""


@dataclass(frozen=True)
class Scenario:
    """One kind of run of the benchmark.

    Attributes:
        name: short id, shown in the table.
        fault: the fault it injects, or ``"healthy"`` for a control.
        description: what the run does, in one line.
        must: findings the run must produce (``"a|b"``: either).
        must_not: findings that would be wrong here (``ANY`` on controls).
        build: runs the training and returns its outcome.
        quick: part of the quick subset that runs in the test suite.
        cause: the fault's true cause, the label of the top-1 cause accuracy
            (:mod:`benchmarks.faults.score` says how a run's first-ranked cause is read): the
            stable id of the diagnosis pass's causes (``Cause.cause``, e.g.
            ``"learning-rate-too-high"``) where a symptom of the fault ranks causes, else the slug
            of the finding that names the fault itself (``"rank-changed-on-resume"``); ``"a|b"``:
            the one cause under either name (``"alpha-too-small|alpha-rank-ratio"``). ``""`` for
            a healthy control.
        config_fix: a change of ``LoraConfig`` or ``TrainingArguments`` undoes the mistake: the
            fix loop (``--fix-loop``) applies the doctor's fix and trains again.
    """

    name: str
    fault: str
    description: str
    must: tuple[str, ...]
    must_not: tuple[str, ...]
    build: Callable[[Spec], Outcome]
    quick: bool = False
    cause: str = ""
    config_fix: bool = False

    @property
    def healthy(self) -> bool:
        return self.fault == "healthy"


# --- building blocks --------------------------------------------------------------------------------
def _lora(spec: Spec, r: int = 8, alpha: float = 16, **kwargs: Any) -> LoraConfig:
    kwargs.setdefault("target_modules", tasks.lora_targets(spec.arch))
    return lora_config(spec, r=r, lora_alpha=alpha, lora_dropout=0.0, **kwargs)


def _peft(spec: Spec, head: str = "lm", **lora: Any) -> Any:
    return get_peft_model(tasks.tiny_model(spec.arch, spec.seed, head=head), _lora(spec, **lora))


def _data(spec: Spec, n: int = 512) -> list[Any]:
    return tasks.chain_data(n, spec.seed)


def _step_of_min(outcome: Outcome, key: str) -> int:
    """The step at which ``key`` was lowest in the run's logs (0 when it was never logged)."""
    points = [(e[key], e["step"]) for e in outcome.log_history if key in e]
    return int(min(points)[1]) if points else 0


# --- healthy controls ---------------------------------------------------------------------------------
def healthy(spec: Spec) -> Outcome:
    """r 8, lora_alpha 16 on every linear layer, learning rate 2e-3, linear decay."""
    return train(spec, _peft(spec), _data(spec))


def healthy_eval(spec: Spec) -> Outcome:
    """A large enough training set (2,048 sequences, under one epoch), evaluated every 10 steps."""
    return train(
        spec,
        _peft(spec),
        _data(spec, 2048),
        eval_data=tasks.chain_data(128, spec.seed + 10_000),
        eval_strategy="steps",
        eval_steps=10,
    )


# --- faults -------------------------------------------------------------------------------------------
def _vocabulary(spec: Spec, **overrides: Any) -> Outcome:
    """LoRA (r 8, lora_alpha 16, every linear layer) on a base that knows the language over the
    whole vocabulary (:func:`tasks.vocabulary_model`), fine-tuned on the clean full-vocabulary
    chain."""
    model = get_peft_model(tasks.vocabulary_model(spec.arch, spec.seed), _lora(spec))
    data = tasks.chain_data(512, spec.seed, tokens=tasks.VOCAB - 1)
    return train(spec, model, data, **overrides)


def healthy_vocabulary(spec: Spec) -> Outcome:
    """A base that knows the language, fine-tuned at 2e-3: the loss starts near 0.25 ln(128) and
    falls."""
    return _vocabulary(spec)


_DESTROYING_LR = 0.3


def loss_at_chance(spec: Spec) -> Outcome:
    """A base that knows the language, fine-tuned at a constant learning rate of 0.3 (150x the
    healthy rate): its first updates destroy it, and the loss sits at ln(128), a uniform guess.
    Logged every 5 steps, the first log already averages the blow-up, so no rise shows."""
    return _vocabulary(spec, learning_rate=_DESTROYING_LR, lr_scheduler_type="constant")


def early_divergence(spec: Spec) -> Outcome:
    """The same, logged every step: the loss jumps about 4x at the second log, to ln(128), and
    stays there (a catastrophe within the first five logs)."""
    return _vocabulary(
        spec, learning_rate=_DESTROYING_LR, lr_scheduler_type="constant", logging_steps=1
    )


def optimizer_without_adapter(spec: Spec) -> Outcome:
    """The optimizer built from the model's parameters before ``get_peft_model`` wraps it: it holds
    the base weights, which peft then freezes, and none of the LoRA parameters, so no update
    reaches any weight."""
    base = tasks.tiny_model(spec.arch, spec.seed)
    optimizer = torch.optim.AdamW(base.parameters(), lr=2e-3)
    model = get_peft_model(base, _lora(spec))
    return train(spec, model, _data(spec), optimizers=(optimizer, None))


def alpha_not_scaled(spec: Spec) -> Outcome:
    """r raised from 4 (lora_alpha 8, scaling 2) to 16 while lora_alpha stays 8: scaling 0.5."""
    return train(spec, _peft(spec, r=16, alpha=8), _data(spec))


def lr_too_low(spec: Spec) -> Outcome:
    """Learning rate 2e-5, a full fine-tuning rate; LoRA wants about 10x more (here 100x)."""
    return train(spec, _peft(spec), _data(spec), learning_rate=2e-5)


def lr_too_high(spec: Spec) -> Outcome:
    """A warm-up to a peak learning rate of 0.3 (150x the healthy rate) over 100 of 120 steps: the
    loss falls while the rate is small, then climbs back as the rate passes what the adapter
    tolerates (about 0.05 here) and stays up. The divergence begins after the lowest loss; where
    the climb ends at ln(128), a model its updates destroyed, ``loss-at-chance`` is the symptom."""
    outcome = train(
        spec,
        _peft(spec),
        _data(spec),
        learning_rate=0.3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=100,
        max_steps=120,
    )
    outcome.onset = _step_of_min(outcome, "loss")
    return outcome


def lr_far_too_high(spec: Spec) -> Outcome:
    """A constant learning rate of 0.5 (250x the healthy rate; 500x the top of AdamW's LoRA range),
    as a typo such as 5e-1 for 5e-4 makes: the update grows to hundreds of times the frozen weights
    while the loss stays far above the healthy run's."""
    return train(spec, _peft(spec), _data(spec), learning_rate=0.5, lr_scheduler_type="constant")


def _starts_with_tag(completions: list[str], **kwargs: Any) -> list[float]:
    """A sparse format reward: 1 for a completion that opens with "<", else 0."""
    return [1.0 if c.startswith("<") else 0.0 for c in completions]


def grpo_tied_rewards(spec: Spec) -> Outcome:
    """TRL's GRPOTrainer, r 16 on every linear layer, 4 completions per prompt scored by a sparse
    format reward that the random policy rarely earns: on most steps every completion of the group
    gets 0, so the advantages and the gradient are exactly zero (loss 0, grad norm 0,
    frac_reward_zero_std 1); the adapter learns on the other steps."""
    import trl
    from datasets import Dataset

    prompts = ["what is two plus two?", "name a colour.", "count to three.", "say hello."] * 4
    trainer_cls = functools.partial(
        trl.GRPOTrainer,
        reward_funcs=_starts_with_tag,
        processing_class=tasks.char_tokenizer(),
        peft_config=_lora(spec, r=16, alpha=32),
    )
    return train(
        spec,
        tasks.tiny_model(spec.arch, spec.seed),
        Dataset.from_dict({"prompt": prompts}),
        trainer_cls=trainer_cls,
        args_cls=trl.GRPOConfig,
        max_steps=8,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=5e-6,
        logging_steps=1,
    )


def adapters_frozen(spec: Spec) -> Outcome:
    """A saved adapter reloaded with ``PeftModel.from_pretrained`` without ``is_trainable=True``
    (the default loads it for inference, frozen), then handed to the Trainer to continue."""
    saved = spec.workdir / "adapter"
    _peft(spec).save_pretrained(saved)
    model = PeftModel.from_pretrained(tasks.tiny_model(spec.arch, spec.seed), saved)
    return train(spec, model, _data(spec))


def _classifier(spec: Spec) -> Any:
    """A sequence classifier with LoRA on every linear layer; peft trains the head (``score``) too."""
    return _peft(spec, head="cls", task_type="SEQ_CLS")


def healthy_checkpointing(spec: Spec) -> Outcome:
    """Gradient checkpointing through the Trainer, which makes the inputs require gradients."""
    return train(
        spec,
        _classifier(spec),
        tasks.class_data(512, spec.seed),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )


def checkpointing_without_input_grads(spec: Spec) -> Outcome:
    """Reentrant gradient checkpointing on a frozen base without ``enable_input_require_grads``.

    The checkpointed blocks see no input that requires a gradient, so torch does not backpropagate
    through them: the LoRA layers inside get no gradient, while the classifier head outside still
    learns and the loss still falls. This is what older transformers releases and hand-written
    loops that call ``torch.utils.checkpoint`` did; current transformers adds the input hook itself,
    so the run removes it (``disable_input_require_grads``) to reproduce the set-up.
    """
    model = _classifier(spec)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    return train(spec, model, tasks.class_data(512, spec.seed))


def attention_only(spec: Spec) -> Outcome:
    """LoRA on the attention projections only (q, v; GPT-2's fused c_attn), not the MLP."""
    return train(
        spec,
        _peft(spec, target_modules=tasks.lora_targets(spec.arch, attention_only=True)),
        _data(spec),
    )


def overfit(spec: Spec) -> Outcome:
    """8 training sequences with half their tokens random, 100 epochs, evaluated every 5 steps: the
    adapter learns the chain, then memorises the noise while the validation loss climbs."""
    outcome = train(
        spec,
        _peft(spec),
        tasks.chain_data(8, spec.seed, noise=0.5),
        eval_data=tasks.chain_data(128, spec.seed + 10_000, noise=0.5),
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        eval_strategy="steps",
        eval_steps=5,
    )
    outcome.onset = _step_of_min(outcome, "eval_loss")  # the overfitting begins after the best
    return outcome


def _dialect(spec: Spec, alpha: float) -> Outcome:
    """LoRA r 16 with ``alpha`` on a pre-trained base learning the chain language's dialect
    (:func:`tasks.pretrained_model`), at learning rate 5e-4, inside LoRA's usual range."""
    model = get_peft_model(
        tasks.pretrained_model(spec.arch, spec.seed), _lora(spec, r=16, alpha=alpha)
    )
    return train(spec, model, tasks.chain_data(1024, spec.seed, dialect=True), learning_rate=5e-4)


def alpha_far_too_small(spec: Spec) -> Outcome:
    """lora_alpha=1 (loralib's default) at r 16 on a pre-trained base: the update is scaled by
    1/16, the adapter barely moves and the loss stays flat far below chance (the quickstart's
    mistake)."""
    return _dialect(spec, alpha=1)


def healthy_pretrained(spec: Spec) -> Outcome:
    """The same pre-trained base and dialect with lora_alpha 32 (scaling 2): the loss falls from
    about 2.6 to about 1.1."""
    return _dialect(spec, alpha=32)


def full_fine_tune_overfit(spec: Spec) -> Outcome:
    """A full fine-tune (no LoRA) on 8 sequences with half their tokens random, 100 epochs,
    evaluated every 5 steps: the model memorises the noise while the validation loss climbs; the
    fixes must be full fine-tuning's (weight decay, a lower learning rate), never r or
    lora_dropout."""
    outcome = train(
        spec,
        tasks.tiny_model(spec.arch, spec.seed),
        tasks.chain_data(8, spec.seed, noise=0.5),
        eval_data=tasks.chain_data(128, spec.seed + 10_000, noise=0.5),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=5,
    )
    outcome.onset = _step_of_min(outcome, "eval_loss")
    return outcome


def labels_masked(spec: Spec) -> Outcome:
    """Every label is -100 (a collator or template that masks the whole sequence as prompt)."""
    data = _data(spec)
    for example in data:
        example["labels"] = torch.full_like(example["labels"], -100)
    return train(spec, _peft(spec), data)


_NAN_STEP = 40


class _NanAt(TrainerCallback):
    """Arms a forward hook that turns the final norm's output into NaN during one training step."""

    def __init__(self, model: Any, arch: str, step: int) -> None:
        base = model.get_base_model()
        norm = base.model.norm if arch == "llama" else base.transformer.ln_f
        self.step = step
        self.armed = False
        norm.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        return output * float("nan") if self.armed else None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.armed = state.global_step + 1 == self.step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.armed = False


def nan_injected(spec: Spec) -> Outcome:
    """At step 40 one forward pass goes NaN (as an fp16 overflow would); the NaN gradient then
    poisons the adapter's weights and every later loss. The Trainer's ``logging_nan_inf_filter``
    (on by default) hides the NaN losses from the logged loss."""
    model = _peft(spec)
    return train(
        spec, model, _data(spec), callbacks=[_NanAt(model, spec.arch, _NAN_STEP)], onset=_NAN_STEP
    )


_RESUME_STEP = 20


def _resumed(spec: Spec, new_r: int) -> Outcome:
    """Trains r 8 for 20 steps with a checkpoint, then resumes it with rank ``new_r``."""
    train(
        spec,
        _peft(spec),
        _data(spec),
        name="first",
        max_steps=_RESUME_STEP,
        save_strategy="steps",
        save_steps=_RESUME_STEP,
    )
    checkpoint = spec.workdir / "first" / f"checkpoint-{_RESUME_STEP}"
    return train(
        spec,
        _peft(spec, r=new_r, alpha=2 * new_r),
        _data(spec),
        resume_from=str(checkpoint),
        onset=_RESUME_STEP,
        name="resumed",
        max_steps=2 * _RESUME_STEP,
    )


def healthy_resume(spec: Spec) -> Outcome:
    """Resumed from its own checkpoint with the same rank."""
    return _resumed(spec, 8)


def resume_other_rank(spec: Spec) -> Outcome:
    """Resumed from an r 8 checkpoint after changing LoraConfig to r 16 (and lora_alpha to 32)."""
    return _resumed(spec, 16)


def _planted(spec: Spec, r: int) -> Outcome:
    """A LoRA student of rank ``r`` learns the planted-rank teacher of ``benchmarks/planted_rank.py``
    (its small form: a one-layer Llama plus a rank-8 update on q, v, up and down; KL to the teacher
    on fresh random tokens, so data is unlimited and only the rank can limit the fit)."""
    if spec.arch != "llama":
        raise Skip("the planted-rank teacher of benchmarks/planted_rank.py is a Llama")
    setup = planted_rank.SMALL
    config, state, teacher = planted_rank.build_models(setup, spec.device, seed=spec.seed)
    student = LlamaForCausalLM(config)
    student.load_state_dict(state)
    lora = lora_config(
        spec, r=r, lora_alpha=2 * r, target_modules=planted_rank.TARGETS, lora_dropout=0.0
    )
    model = get_peft_model(student, lora)
    return train(
        spec,
        model,
        planted_rank.FreshTokens(setup.vocab, setup.seq, seed=spec.seed),
        trainer_cls=functools.partial(planted_rank.KLTrainer, teacher),
        max_steps=setup.steps,
        per_device_train_batch_size=setup.batch,
        learning_rate=setup.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, setup.steps // 40),
    )


def rank_too_low(spec: Spec) -> Outcome:
    """r 2 against a planted update of rank 8."""
    return _planted(spec, 2)


def healthy_rank(spec: Spec) -> Outcome:
    """r 16 against a planted update of rank 8 (rank-underused, an info, is true here)."""
    return _planted(spec, 16)


def memory_pressure(spec: Spec) -> Outcome:
    """On a GPU, another tenant's memory leaves 4% of the device free; the run's peak nears capacity."""
    if spec.device != "cuda" or not torch.cuda.is_available():
        raise Skip("needs a CUDA GPU (run with --device cuda)")
    free, _total = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free - 0.04 * _total), dtype=torch.uint8, device="cuda")
    try:
        return train(spec, _peft(spec).cuda(), _data(spec), per_device_train_batch_size=64)
    finally:
        del ballast
        torch.cuda.empty_cache()


# --- the table ----------------------------------------------------------------------------------------
_WRONG_CAUSE = ("non-finite-values", "zero-loss", "loss-divergence", "adapter-not-learning")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("healthy", "healthy", healthy.__doc__ or "", (), (ANY,), healthy, quick=True),
    Scenario("healthy-eval", "healthy", healthy_eval.__doc__ or "", (), (ANY,), healthy_eval),
    Scenario(
        "healthy-gc",
        "healthy",
        healthy_checkpointing.__doc__ or "",
        (),
        (ANY,),
        healthy_checkpointing,
    ),
    Scenario("healthy-resume", "healthy", healthy_resume.__doc__ or "", (), (ANY,), healthy_resume),
    Scenario("healthy-rank", "healthy", healthy_rank.__doc__ or "", (), (ANY,), healthy_rank),
    Scenario(
        "healthy-pretrained",
        "healthy",
        healthy_pretrained.__doc__ or "",
        (),
        (ANY,),
        healthy_pretrained,
    ),
    Scenario(
        "healthy-vocabulary",
        "healthy",
        healthy_vocabulary.__doc__ or "",
        (),
        (ANY,),
        healthy_vocabulary,
    ),
    Scenario(
        "alpha-not-scaled",
        "r changed without alpha",
        alpha_not_scaled.__doc__ or "",
        ("alpha-rank-ratio",),
        ("adapter-shape", *_WRONG_CAUSE),
        alpha_not_scaled,
        quick=True,
        cause="alpha-too-small|alpha-rank-ratio",
        config_fix=True,
    ),
    Scenario(
        "rank-too-low",
        "rank too low (planted task)",
        rank_too_low.__doc__ or "",
        ("rank-saturated",),
        ("rank-underused", *_WRONG_CAUSE),
        rank_too_low,
        cause="rank-too-small|rank-saturated",
        config_fix=True,
    ),
    Scenario(
        "lr-too-low",
        "learning rate too low",
        lr_too_low.__doc__ or "",
        ("loss-plateau|loss-at-chance",),
        ("rank-saturated", *_WRONG_CAUSE),
        lr_too_low,
        cause="learning-rate-too-low",
        config_fix=True,
    ),
    Scenario(
        "lr-too-high",
        "learning rate too high",
        lr_too_high.__doc__ or "",
        ("loss-divergence|non-finite-values|loss-at-chance",),
        ("adapter-not-learning", "zero-loss", "overfit"),
        lr_too_high,
        cause="learning-rate-too-high",
        config_fix=True,
    ),
    Scenario(
        "lr-far-too-high",
        "learning rate far too high (constant 0.5)",
        lr_far_too_high.__doc__ or "",
        ("learning-rate-too-high", "update-too-large|non-finite-values|loss-divergence"),
        ("adapter-not-learning", "zero-loss", "overfit", "rank-saturated"),
        lr_far_too_high,
        cause="learning-rate-too-high",
    ),
    Scenario(
        "grpo-tied-rewards",
        "GRPO, rewards tied within groups",
        grpo_tied_rewards.__doc__ or "",
        ("no-reward-variance",),
        ("adapter-not-learning", "no-trainable-params", "non-finite-values"),
        grpo_tied_rewards,
        cause="no-reward-variance",
    ),
    Scenario(
        "adapters-frozen",
        "adapters frozen",
        adapters_frozen.__doc__ or "",
        ("no-trainable-params|adapter-not-learning",),
        ("loss-divergence", "overfit"),
        adapters_frozen,
        quick=True,
        cause="lora-not-trainable|no-trainable-params",
    ),
    Scenario(
        "gc-no-input-grads",
        "checkpointing without input grads",
        checkpointing_without_input_grads.__doc__ or "",
        ("adapter-not-learning",),
        ("non-finite-values", "loss-divergence", "zero-loss"),
        checkpointing_without_input_grads,
        cause="checkpointing-without-input-grads",
        config_fix=True,
    ),
    Scenario(
        "attention-only",
        "adapters on attention only",
        attention_only.__doc__ or "",
        ("attention-only-targets",),
        _WRONG_CAUSE,
        attention_only,
        cause="attention-only-targets",
        config_fix=True,
    ),
    Scenario(
        "overfit",
        "tiny dataset, many epochs",
        overfit.__doc__ or "",
        ("overfit",),
        ("loss-plateau", *_WRONG_CAUSE),
        overfit,
        cause="overfit",
        config_fix=True,
    ),
    Scenario(
        "full-ft-overfit",
        "full fine-tune overfits",
        full_fine_tune_overfit.__doc__ or "",
        ("overfit",),
        ("loss-plateau", *_WRONG_CAUSE),
        full_fine_tune_overfit,
        cause="overfit",
    ),
    Scenario(
        "alpha-far-too-small",
        "lora_alpha far below r (pre-trained base)",
        alpha_far_too_small.__doc__ or "",
        ("alpha-rank-ratio", "loss-plateau|loss-at-chance"),
        ("rank-saturated", *_WRONG_CAUSE),
        alpha_far_too_small,
        cause="alpha-too-small",
    ),
    Scenario(
        "labels-masked",
        "all labels masked",
        labels_masked.__doc__ or "",
        ("zero-loss|non-finite-values",),
        ("overfit", "loss-plateau"),
        labels_masked,
        quick=True,
        cause="data-or-task|zero-loss",
    ),
    Scenario(
        "nan-injected",
        "NaN injected",
        nan_injected.__doc__ or "",
        ("non-finite-values|zero-loss",),
        ("overfit",),
        nan_injected,
        quick=True,
        cause="forward-numerics",
    ),
    Scenario(
        "resume-other-rank",
        "resumed with a different rank",
        resume_other_rank.__doc__ or "",
        ("rank-changed-on-resume",),
        ("non-finite-values", "loss-divergence"),
        resume_other_rank,
        cause="rank-changed-on-resume",
    ),
    Scenario(
        "weights-not-updating",
        "optimizer without the adapter",
        optimizer_without_adapter.__doc__ or "",
        ("weights-not-updating",),
        ("loss-plateau", "rank-saturated", "loss-divergence", "non-finite-values", "zero-loss"),
        optimizer_without_adapter,
        cause="adapter-not-in-optimizer",
    ),
    Scenario(
        "loss-at-chance",
        "learning rate far too high (coarse logs)",
        loss_at_chance.__doc__ or "",
        ("loss-at-chance",),
        ("loss-plateau", "rank-saturated", "adapter-not-learning", "zero-loss", "overfit"),
        loss_at_chance,
        cause="learning-rate-too-high",
    ),
    Scenario(
        "early-divergence",
        "learning rate far too high (first logs)",
        early_divergence.__doc__ or "",
        ("loss-divergence",),
        ("loss-plateau", "rank-saturated", "adapter-not-learning", "zero-loss", "overfit"),
        early_divergence,
        cause="learning-rate-too-high",
    ),
    Scenario(
        "memory-pressure",
        "memory pressure (GPU only)",
        memory_pressure.__doc__ or "",
        ("oom-risk|out-of-memory",),
        ("non-finite-values", "loss-divergence"),
        memory_pressure,
        cause="oom-risk|out-of-memory",
    ),
)
