"""training-died: why training died, with the cause, the fact that confirms it and the fix.

Each crash signature is reproduced for real on CPU where it can be (a tiny Llama from a config, a
tokenizer built in the test, a Trainer with the callback); the others are raised through the guard
the way their library raises them, with the library's message. In every case the error propagates
unchanged and the JSON is written first. The pure classifier is tested on tables of facts: each
signature fires where its facts confirm it and stays quiet where a fact refutes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import Rows, tiny_args, tiny_llama, tiny_peft, tiny_tokenizer
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from lora_doctor import LoraDoctorCallback, watch
from lora_doctor.checks import Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.crashes import SIGNATURES, Crash, CrashFacts, classify
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, RunFacts
from lora_doctor.history import History
from lora_doctor.probes.crash import record_crash
from lora_doctor.report import load_schema

#: The TrainingArguments field of gradient checkpointing in the installed transformers.
CKPT = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)
TEXTS = [
    "hello world",
    "abc",
    "the quick brown fox",
    "lora doctor",
    "x y z",
    "more text",
    "a",
    "bb",
]


class Texts(torch.utils.data.Dataset):
    """Rows tokenized by ``tok`` (of different lengths), with or without labels."""

    def __init__(self, tok: Any, texts: list[str], labels: bool = False) -> None:
        self.rows = [dict(tok(t)) for t in texts]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = dict(self.rows[i])
        if self.labels:
            row["labels"] = list(row["input_ids"])
        return row


def lora(base: Any) -> Any:
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def llama_for(tok: Any) -> LlamaForCausalLM:
    """A tiny Llama whose vocabulary is the tokenizer's, as a model trained with it would have."""
    config = tiny_llama().config
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "lora_doctor.json").read_text())
    jsonschema.validate(data, load_schema())
    return data


def told(finding: dict[str, Any]) -> str:
    """What the finding tells the user: its message, then its fix (summary and steps), where a
    remedy the recommendation spells out now stands (the message no longer repeats it)."""
    rec = finding["recommendation"] or {}
    return " ".join([finding["message"], rec.get("summary", ""), *rec.get("steps", [])])


def died(out: Path) -> dict[str, Any]:
    data = report(out)
    assert "training-stopped-early" not in {f["slug"] for f in data["findings"]}
    (finding,) = [f for f in data["findings"] if f["slug"] == "training-died"]
    return finding  # type: ignore[no-any-return]


# --- real reproductions on CPU ---------------------------------------------------------------------
#: A builder makes the Trainer of a case: (output folder, extra TrainingArguments, apply the code
#: fix) -> Trainer. ``fixed`` applies the fix that is code, not arguments (a pad token, a resize).
Builder = Callable[[Path, dict[str, Any], bool], Trainer]


def _trainer(out: Path, extra: dict[str, Any], **kwargs: Any) -> Trainer:
    return Trainer(args=tiny_args(out, **extra), callbacks=[LoraDoctorCallback()], **kwargs)


def no_pad_token(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    tok = tiny_tokenizer()
    tok.pad_token = tok.unk_token if fixed else None  # a Llama-style tokenizer ships without one
    data = Texts(tok, TEXTS)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    return _trainer(
        out, extra, model=lora(llama_for(tok)), train_dataset=data, data_collator=collator
    )


def added_tokens(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    tok = tiny_tokenizer()
    base = llama_for(tok)
    tok.add_tokens(["<tool>", "</tool>"])
    if fixed:
        base.resize_token_embeddings(len(tok))
    return _trainer(
        out,
        extra,
        model=lora(base),
        train_dataset=Texts(tok, ["<tool>call</tool>"] * 8),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )


def reentrant_checkpointing(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    """Reentrant checkpointing on the model itself, without the input hook current transformers
    adds when the Trainer turns checkpointing on (older releases and hand-made set-ups lack it)."""
    model = tiny_peft()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    return _trainer(out, extra, model=model, train_dataset=Rows())


def frozen_adapter(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    """An adapter loaded for inference: PeftModel.from_pretrained without is_trainable=True."""
    model = tiny_peft()
    for param in model.parameters():
        param.requires_grad_(False)
    return _trainer(out, extra, model=model, train_dataset=Rows())


def mixed_dtypes(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    """A bfloat16 model whose head was kept in float32, trained without autocast."""
    base = tiny_llama().to(torch.bfloat16)
    base.lm_head.float()
    return _trainer(out, extra, model=lora(base), train_dataset=Rows())


def unpadded_labels(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    tok = tiny_tokenizer()
    return _trainer(
        out,
        extra,
        model=tiny_peft(),
        train_dataset=Texts(tok, TEXTS, labels=True),
        data_collator=DataCollatorWithPadding(tok),
    )


def no_labels(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    tok = tiny_tokenizer()
    return _trainer(
        out,
        extra,
        model=tiny_peft(),
        train_dataset=Texts(tok, TEXTS),
        data_collator=DataCollatorWithPadding(tok),
    )


class GpuLikeFp16Trainer(Trainer):
    """fp16=True as accelerate runs it on a GPU: a GradScaler scales the loss and unscales the
    gradients before clipping (accelerate leaves the scaler out on CPU; torch's CPU GradScaler is
    the same class, with the same check)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.accelerator.native_amp = True
        self.accelerator.scaler = torch.amp.GradScaler("cpu")


def fp16_weights(out: Path, extra: dict[str, Any], fixed: bool) -> Trainer:
    """An adapter whose weights are float16 (a model cast with .half() after get_peft_model)."""
    return GpuLikeFp16Trainer(
        model=tiny_peft().half(),
        args=tiny_args(out, fp16=True, **extra),
        train_dataset=Rows(),
        callbacks=[LoraDoctorCallback()],
    )


@dataclasses.dataclass(frozen=True)
class Real:
    build: Builder
    error: type[BaseException]
    message: str  # how the propagated error's message starts
    raised_in: str  # the function the library raised it in
    signature: str
    fact: str  # in the finding's message: the fact that confirms the cause
    fix: str  # in the finding's message: the exact fix
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)


REAL = {
    "pad-token-missing": Real(
        no_pad_token,
        ValueError,
        "Asking to pad but the tokenizer does not have a padding token",
        "_get_padding_truncation_strategies",
        "pad-token-missing",
        "has pad_token=None",
        "tokenizer.pad_token = tokenizer.unk_token",
    ),
    "token-id-past-embedding": Real(
        added_tokens,
        IndexError,
        "index out of range in self",
        "embedding",
        "token-id-past-embedding",
        "the tokenizer has 47 tokens but the input embedding has 45 rows",
        "model.resize_token_embeddings(len(tokenizer))",
    ),
    "checkpointing-without-input-grads": Real(
        reentrant_checkpointing,
        RuntimeError,
        "element 0 of tensors does not require grad and does not have a grad_fn",
        "_engine_run_backward",
        "checkpointing-without-input-grads",
        "gradient checkpointing is on with use_reentrant=True",
        "model.enable_input_require_grads()",
        {CKPT: True, f"{CKPT}_kwargs": {"use_reentrant": False}},
    ),
    "no-trainable-parameters": Real(
        frozen_adapter,
        RuntimeError,
        "element 0 of tensors does not require grad and does not have a grad_fn",
        "_engine_run_backward",
        "no-trainable-parameters",
        "no parameter of the model requires grad (0 trainable)",
        "PeftModel.from_pretrained(base_model, adapter_path, is_trainable=True)",
    ),
    "fp16-trainable-weights": Real(
        fp16_weights,
        ValueError,
        "Attempting to unscale FP16 gradients.",
        "_unscale_grads_",
        "fp16-trainable-weights",
        "trainable tensors are float16 (e.g. base_model.model.model.layers.0.self_attn.q_proj",
        "Cast the trainable parameters to float32 after get_peft_model",
        {"fp16": False, "bf16": True},
    ),
    "dtype-mismatch": Real(
        mixed_dtypes,
        RuntimeError,
        "expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float",
        "forward",
        "dtype-mismatch",
        "training runs without autocast (fp16=False, bf16=False)",
        "TrainingArguments(bf16=True): autocast runs each matrix product in one dtype",
        {"bf16": True, "fp16": False},
    ),
    "labels-not-padded": Real(
        unpadded_labels,
        ValueError,
        "Unable to create tensor",
        "convert_to_tensors",
        "labels-not-padded",
        "DataCollatorWithPadding pads only what the tokenizer pads",
        "DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)",
    ),
    "no-labels": Real(
        no_labels,
        ValueError,
        "The model did not return a loss from the inputs",
        "compute_loss",
        "no-labels",
        "the batch holds input_ids, attention_mask: no labels",
        "DataCollatorForLanguageModeling(tokenizer, mlm=False)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL.values()), ids=list(REAL))
def test_real_crash_is_diagnosed_and_propagates(tmp_path: Path, case: Real) -> None:
    trainer = case.build(tmp_path, {}, False)
    with pytest.raises(case.error) as err:
        trainer.train()
    assert str(err.value).startswith(case.message)
    assert err.traceback[-1].name == case.raised_in  # the library's own error, where it raised it
    finding = died(tmp_path)
    assert (finding["code"], finding["severity"], finding["step"]) == ("LD501", "error", 1)
    assert finding["evidence"]["signature"] == case.signature
    assert case.fact in finding["message"]
    assert case.fix in told(finding)
    assert finding["recommendation"]["config_changes"] == case.changes


#: Cases whose fix is checked by training again: code fixes applied by the builder, argument fixes
#: taken from the finding's config_changes.
FIXES = [
    "pad-token-missing",
    "token-id-past-embedding",
    "checkpointing-without-input-grads",
    "dtype-mismatch",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXES, ids=FIXES)
def test_the_recommended_fix_trains(tmp_path: Path, name: str) -> None:
    case = REAL[name]
    with pytest.raises(case.error):
        case.build(tmp_path / "broken", {}, False).train()
    changes = died(tmp_path / "broken")["recommendation"]["config_changes"]
    trainer = case.build(tmp_path / "fixed", changes, True)
    trainer.train()
    assert trainer.state.global_step == 4
    assert "training-died" not in {f["slug"] for f in report(tmp_path / "fixed")["findings"]}


# --- raised through the guard the way the libraries raise them ------------------------------------
def _raise_in_forward(model: Any, error: BaseException) -> None:
    """The model's first forward raises ``error`` (where vLLM generation and device errors occur)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        raise error

    model.get_base_model().forward = forward


def _raise_in_prepare(trainer: Trainer, error: BaseException) -> None:
    """accelerate's ``prepare_model`` raises ``error``, as it does for a misplaced model."""

    def prepare_model(*args: Any, **kwargs: Any) -> Any:
        raise error

    trainer.accelerator.prepare_model = prepare_model  # type: ignore[method-assign]


@dataclasses.dataclass(frozen=True)
class Raised:
    error: BaseException
    where: str  # "forward" or "prepare"
    device_map: dict[str, Any] | None
    signature: str | None  # None: no cause claimed
    step: int
    text: tuple[str, ...]  # in the finding's message
    r: int = 4


# accelerate 1.x Accelerator.prepare_model and .prepare; torch's device check; vLLM's
# WorkerLoRAManager._load_adapter wrapped by its engine core; torch's NCCL watchdog; DeepSpeed below.
RAISED = {
    "quantized-model-on-another-device": Raised(
        ValueError(
            "You can't train a model that has been loaded in 8-bit or 4-bit precision on a "
            "different device than the one you're training on. Make sure you loaded the model on "
            "the correct device using for example `device_map={'':torch.cuda.current_device()}` or "
            "`device_map={'':torch.xpu.current_device()}`"
        ),
        "prepare",
        {"": 1},
        "quantized-model-placement",
        0,
        ("its hf_device_map places it on cuda:1", "device_map={'': PartialState().process_index}"),
    ),
    "quantized-model-offloaded": Raised(
        ValueError(
            "You can't train a model that has been loaded in 8-bit or 4-bit precision with CPU or "
            "disk offload. If you want train the 8-bit or 4-bit model in CPU, please install "
            "bitsandbytes with multi-backend, see https://huggingface.co/docs/bitsandbytes/main/en/"
            "installation#multi-backend"
        ),
        "prepare",
        {"model": 0, "lm_head": "cpu"},
        "quantized-model-placement",
        0,
        ("its hf_device_map places it on cpu, cuda:0", "put layers on the CPU or disk"),
    ),
    "device-map-in-distributed-run": Raised(
        ValueError(
            "You can't train a model that has been loaded with `device_map='auto'` in any "
            "distributed mode. Please rerun your script specifying `--num_processes=1` or by "
            "launching with `python {{myscript.py}}`."
        ),
        "prepare",
        {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1},
        "device-map-in-distributed-run",
        0,
        ("hf_device_map places it on cuda:0, cuda:1", "PartialState().process_index"),
    ),
    "device-mismatch-offloaded": Raised(
        RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, cuda:0 "
            "and cpu! (when checking argument for argument mat2 in method wrapper_CUDA_mm)"
        ),
        "forward",
        {"model": 0, "lm_head": "cpu"},
        "device-mismatch",
        1,
        ("the model is placed on cpu, cuda:0", "BitsAndBytesConfig(load_in_4bit=True)"),
    ),
    "device-mismatch-not-the-model": Raised(
        RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, cuda:0 "
            "and cpu! (when checking argument for argument mat2 in method wrapper_CUDA_mm)"
        ),
        "forward",
        None,
        None,
        1,
        ("every parameter is on cpu", "came from the batch or custom code"),
    ),
    "vllm-max-lora-rank": Raised(
        RuntimeError(
            "Worker failed with error 'LoRA rank 32 is greater than max_lora_rank 16.', please "
            "check the stack trace above for the root cause"
        ),
        "forward",
        None,
        "vllm-max-lora-rank",
        1,
        ("adapter 'default' has r=32", "Start vLLM with max_lora_rank=32"),
        r=32,
    ),
    "nccl-timeout-in-one-process": Raised(
        torch.distributed.DistBackendError(
            "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1580, "
            "OpType=ALLREDUCE, NumelIn=466119168, NumelOut=466119168, Timeout(ms)=600000) ran for "
            "600060 milliseconds before timing out."
        ),
        "forward",
        None,
        None,
        1,
        ("the run rules it out: a single process",),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RAISED.values()), ids=list(RAISED))
def test_library_error_through_the_guard(tmp_path: Path, case: Raised) -> None:
    model = tiny_peft(r=case.r, lora_alpha=2 * case.r)
    trainer = _trainer(tmp_path, {}, model=model, train_dataset=Rows())
    if case.device_map is not None:  # what from_pretrained(device_map=...) leaves on a GPU machine
        model.get_base_model().hf_device_map = case.device_map
    if case.where == "prepare":
        _raise_in_prepare(trainer, case.error)
    else:
        _raise_in_forward(model, case.error)
    with pytest.raises(type(case.error)) as err:
        trainer.train()
    assert err.value is case.error  # unchanged
    finding = died(tmp_path)
    assert finding["evidence"]["signature"] == case.signature
    assert finding["step"] == case.step
    for text in case.text:
        assert text in told(finding)
    if case.signature is None:
        assert finding["recommendation"] is None


@pytest.mark.slow
def test_deepspeed_loss_assertion_with_checkpointing_facts(tmp_path: Path) -> None:
    """Under DeepSpeed ZeRO-3 the same set-up dies in DeepSpeedEngine.backward, which asserts a
    loss with a grad_fn (deepspeed/runtime/engine.py); the facts still point at checkpointing."""
    trainer = reentrant_checkpointing(tmp_path, {}, False)

    def backward(loss: torch.Tensor, **kwargs: Any) -> None:  # DeepSpeedEngine.backward's check
        assert isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.grad_fn is not None, (
            "loss must be a scalar tensor. If you need to pass output gradients, backward() of "
            "output tensors"
        )

    trainer.accelerator.backward = backward  # type: ignore[method-assign]
    with pytest.raises(AssertionError, match="loss must be a scalar tensor"):
        trainer.train()
    finding = died(tmp_path)
    assert finding["evidence"]["signature"] == "checkpointing-without-input-grads"
    assert "DeepSpeed's engine.backward asserts a loss with a grad_fn" in finding["message"]


@pytest.mark.slow
def test_refuted_cause_is_not_claimed(tmp_path: Path) -> None:
    """A token id past the embedding that the tokenizer did not make: its 45 tokens fit the 128
    rows, so 'tokens added without resizing' is ruled out and no cause is claimed."""
    rows = Rows()
    rows.ids[3, 2] = 200  # a corrupt id in the data
    trainer = _trainer(
        tmp_path, {}, model=tiny_peft(), train_dataset=rows, processing_class=tiny_tokenizer()
    )
    with pytest.raises(IndexError, match="index out of range in self"):
        trainer.train()
    finding = died(tmp_path)
    assert finding["evidence"]["signature"] is None and finding["recommendation"] is None
    assert finding["title"].startswith("Training died of IndexError at step")
    assert (
        "rules it out: the tokenizer's 45 tokens fit the embedding's 128 rows" in finding["message"]
    )


class CustomLossTrainer(Trainer):
    """A custom compute_loss that reads a key the batches of step 4 lack: a KeyError."""

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step == 3:
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            _ = inputs["labels"]
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.slow
def test_unknown_error_gets_no_guess(tmp_path: Path) -> None:
    trainer = CustomLossTrainer(
        model=tiny_peft(),
        args=tiny_args(tmp_path),
        train_dataset=Rows(),
        callbacks=[LoraDoctorCallback()],
    )
    with pytest.raises(KeyError, match="labels"):
        trainer.train()
    finding = died(tmp_path)
    assert finding["title"] == "Training died of KeyError at step 4"
    assert finding["recommendation"] is None and finding["evidence"]["causes"] == []
    readings = finding["evidence"]["last_readings"]
    assert [readings[k]["step"] for k in ("loss", "grad_norm", "learning_rate")] == [3, 3, 3]
    assert f"loss {readings['loss']['value']:.4g} (step 3)" in finding["message"]


@pytest.mark.slow
def test_classifier_error_never_hides_the_training_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in the classifier")

    monkeypatch.setattr("lora_doctor.checks.run.classify", broken)
    monkeypatch.setattr("lora_doctor.probes.crash._fill_parameters", broken)
    trainer = no_pad_token(tmp_path, {}, False)
    with caplog.at_level(logging.WARNING, logger="lora_doctor"), pytest.raises(ValueError) as err:
        trainer.train()
    assert str(err.value).startswith("Asking to pad")
    assert "training-died" not in {f["slug"] for f in report(tmp_path)["findings"]}  # still written
    assert any("internal error in check LD501" in r.getMessage() for r in caplog.records)


# --- what else ends a run -------------------------------------------------------------------------
def test_out_of_memory_is_not_reported_twice(tmp_path: Path) -> None:
    doctor = Doctor(emit=False)
    path = tmp_path / "d.json"
    with pytest.raises(torch.OutOfMemoryError), watch(doctor, report_path=path):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert [f["slug"] for f in json.loads(path.read_text())["findings"]] == ["out-of-memory"]


def test_rank_change_is_not_reported_twice() -> None:
    facts = RunFacts(
        adapters={"default": AdapterFacts(r=8)},
        checkpoint_adapters={"default": AdapterFacts(r=4)},
        resumed_from="out/checkpoint-2",
    )
    error = RuntimeError("Error(s) in loading state_dict for PeftModelForCausalLM: size mismatch")
    facts.crash = Crash.from_exception(error, 0)
    doctor = Doctor(facts=facts, emit=False)
    doctor.run_phase(Phase.SETUP, 0)
    doctor.run_phase(Phase.END, 0)
    assert [f.slug for f in doctor.findings] == ["rank-changed-on-resume"]


def test_interrupt_is_not_a_crash() -> None:
    doctor = Doctor(emit=False)
    assert record_crash(doctor, KeyboardInterrupt(), 3) is False
    assert doctor.facts.crash is None


def test_training_died_can_be_silenced() -> None:
    doctor = Doctor(DoctorConfig(ignore={"training-died"}), emit=False)
    doctor.facts.crash = Crash.from_exception(KeyError("text"), 2)
    assert doctor.run_phase(Phase.END, 2) == []


# --- the classifier on tables of facts ------------------------------------------------------------
def _crash(error: BaseException, **facts: Any) -> Crash:
    return Crash.from_exception(error, 2, CrashFacts(**facts))


RUNTIME_DDP = RuntimeError(
    "Expected to mark a variable ready only once. This error is caused by one of the following "
    "reasons: 1) Use of a module parameter outside the `forward` function."
)
ELEMENT_0 = RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
DS_LOSS = AssertionError(
    "loss must be a scalar tensor. If you need to pass output gradients, backward() of output tensors"
)
CUDA_ASSERT = RuntimeError(
    "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported "
    "at some other API call, so the stacktrace below might be incorrect."
)
NO_LOSS = ValueError(
    "The model did not return a loss from the inputs, only the following keys: logits. For "
    "reference, the inputs it received are input_ids,attention_mask,labels."
)
UNPADDED = ValueError(
    "Unable to create tensor, you should probably activate truncation and/or padding with "
    "'padding=True' 'truncation=True' to have batched tensors with the same length. Perhaps your "
    "features (`labels` in this case) have excessive nesting (inputs type `list` where type `int` "
    "is expected)."
)
PAD = ValueError(
    "Asking to pad but the tokenizer does not have a padding token. Please select a token to use "
    "as `pad_token` `(tokenizer.pad_token = tokenizer.eos_token e.g.)` or add a new pad token via "
    "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`."
)
UNSCALE = ValueError("Attempting to unscale FP16 gradients.")
DTYPE_4BIT = RuntimeError(
    "expected mat1 and mat2 to have the same dtype, but got: float != c10::Half"
)
GLOO_PEER = RuntimeError(
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
    "[10.0.0.2]:29500"
)
PEER = {"rank": 3, "file": "out/lora_doctor.rank3.json", "title": "Training died at step 7: x"}

#: (error, facts) -> the signature claimed (None: no cause claimed), and a text of the message.
TABLE: dict[str, tuple[Crash, str | None, str]] = {
    "ddp-reentrant-fires": (
        _crash(RUNTIME_DDP, world_size=4, checkpointing=True, use_reentrant=True),
        "ddp-reentrant-checkpointing",
        "DistributedDataParallel over 4 processes",
    ),
    "ddp-non-reentrant-quiet": (
        _crash(RUNTIME_DDP, world_size=4, checkpointing=True, use_reentrant=False),
        None,
        "no reentrant gradient checkpointing",
    ),
    "deepspeed-loss-fires": (
        _crash(
            DS_LOSS, trainable_params=8, checkpointing=True, use_reentrant=True, input_grads=False
        ),
        "checkpointing-without-input-grads",
        "DeepSpeed's engine.backward",
    ),
    "element-0-unknown-facts-quiet": (_crash(ELEMENT_0), None, "'element 0 of tensors"),
    "element-0-input-grads-quiet": (
        _crash(ELEMENT_0, trainable_params=8, checkpointing=True, input_grads=True),
        None,
        "the input embedding's output already requires grad",
    ),
    "cuda-assert-fires": (
        _crash(CUDA_ASSERT, tokenizer_len=128258, num_embeddings=128256),
        "token-id-past-embedding",
        "the tokenizer has 128,258 tokens but the input embedding has 128,256 rows",
    ),
    "cuda-assert-fits-quiet": (
        _crash(CUDA_ASSERT, tokenizer_len=128256, num_embeddings=128256),
        None,
        "fit the embedding's 128,256 rows",
    ),
    "pad-token-set-quiet": (
        _crash(PAD, has_tokenizer=True, tokenizer="LlamaTokenizerFast", pad_token="<pad>"),
        None,
        "has pad_token='<pad>'",
    ),
    "pad-token-unread-fires": (_crash(PAD), "pad-token-missing", "The message names this cause"),
    "fp16-fires": (
        _crash(UNSCALE, trainable_fp16_count=2, trainable_fp16=["a", "b"], bf16_supported=False),
        "fp16-trainable-weights",
        "2 trainable tensors are float16 (e.g. a, b)",
    ),
    "fp16-float32-quiet": (
        _crash(UNSCALE, trainable_dtypes={"float32": 4}),
        None,
        "none float16",
    ),
    "dtype-4bit-fires": (
        _crash(DTYPE_4BIT, param_dtypes={"float32": 3, "float16": 2}, compute_dtype="float16"),
        "dtype-mismatch",
        "4-bit compute dtype float16",
    ),
    "dtype-one-dtype-quiet": (
        _crash(DTYPE_4BIT, param_dtypes={"float16": 20}),
        None,
        "every parameter of the model is float16",
    ),
    "labels-seq2seq-quiet": (
        _crash(UNPADDED, data_collator="DataCollatorForSeq2Seq"),
        None,
        "DataCollatorForSeq2Seq pads labels",
    ),
    "labels-reached-model-quiet": (_crash(NO_LOSS), None, "labels reached the model"),
    "peer-died-fires": (
        _crash(GLOO_PEER, world_size=8, peer_reports=[PEER]),
        "collective-failed",
        "Rank 3 died first: Training died at step 7: x",
    ),
}


@pytest.mark.parametrize("name", list(TABLE), ids=list(TABLE))
def test_classifier_table(name: str) -> None:
    crash, signature, text = TABLE[name]
    finding = classify(crash, RunFacts())
    assert finding.evidence["signature"] == signature
    assert text in finding.message
    if signature is None:
        assert finding.recommendation is None
        assert finding.title.startswith("Training died of ")


def test_every_signature_is_tested() -> None:
    """Each signature is claimed by at least one test above (real, raised, or table)."""
    claimed = {c.signature for c in REAL.values()} | {c.signature for c in RAISED.values()}
    claimed |= {s for _, s, _ in TABLE.values()}
    assert {s.key for s in SIGNATURES} <= claimed


def test_last_readings_name_the_last_finite_values() -> None:
    history = History.from_log_history(
        [
            {"step": 1, "loss": 2.0, "grad_norm": 1.0, "learning_rate": 2e-4},
            {"step": 2, "loss": float("nan"), "grad_norm": 0.5},
        ]
    )
    finding = classify(Crash.from_exception(KeyError("x"), 2), RunFacts(), history)
    assert (
        "loss 2 (step 1), grad_norm 0.5 (step 2), learning_rate 0.0002 (step 1)" in finding.message
    )


# --- the GPU script ---------------------------------------------------------------------------------
def _gpu_script() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_crashes.py"
    spec = importlib.util.spec_from_file_location("gpu_crashes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_refuses_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gpu_script().main(["--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_gpu_script_dry_run_passes(tmp_path: Path) -> None:
    """Part (a) on CPU, in its own process as on the GPU: IndexError instead of the device-side
    assert, the same finding."""
    assert _gpu_script().main(["--dry", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "device-side-assert" / "result0.json").read_text())
    assert result == {
        "surfaced": {"error": "IndexError", "message": "index out of range in self"},
        "failed": [],
    }


def _raised_through(*names: str) -> BaseException:
    """An exception whose traceback passes through functions of these names, outermost first."""

    def call(i: int) -> None:
        if i == len(names):
            raise RuntimeError("my callback broke")
        code = compile(f"def {names[i]}(f, i):\n    f(i)\n", "<frames>", "exec")
        scope: dict[str, Any] = {}
        exec(code, scope)
        scope[names[i]](call, i + 1)

    try:
        call(0)
    except RuntimeError as err:
        return err
    raise AssertionError("not raised")


@pytest.mark.parametrize(
    ("frames", "where", "step"),
    [
        (("_inner_training_loop", "call_event", "on_step_end"), "a callback's on_step_end", 30),
        (("_inner_training_loop", "training_step"), "the training step", 31),
        (("_inner_training_loop",), "the training step", 31),
    ],
    ids=["user-callback", "in-the-step", "in-the-loop"],
)
def test_where_a_crash_happened_and_its_step(
    frames: tuple[str, ...], where: str, step: int
) -> None:
    """A user's callback raising in on_step_end (global_step already 30) died after step 30, not
    during step 31."""
    crash = Crash.from_exception(_raised_through(*frames), 30)
    finding = classify(crash, RunFacts())
    assert finding.step == step and finding.evidence["where"] == where
