"""Why training died: the crash signatures of LoRA and QLoRA training, each checked against the run.

When an exception escapes ``trainer.train()`` the callback's guard (or :func:`lora_doctor.watch`)
records it as plain data (:class:`Crash`: the exception's type, message and traceback frames, the step,
and :class:`CrashFacts`, what the Trainer's objects told at that moment, read by
:mod:`lora_doctor.probes.crash`). :func:`classify` turns it into the ``training-died`` finding.

Each known crash is one :class:`Signature` in :data:`SIGNATURES`: the exception types that carry it, a
pattern of the message the library raises, where the library raises it, and a check of the run's facts
that confirms or refutes the cause (the tokenizer's length against the embedding's rows, the pad
token, which parameters require grad, the checkpointing settings, dtypes and devices). A cause is
named only when a fact supports it, or when the message names it by itself; a fact against it rules
it out. An exception no signature explains gets no guess: the finding says what died, where, and the
doctor's last readings. Signatures were chosen and ranked from public issue threads (``docs/crashes.md``).

This module imports neither torch nor transformers: it reads names and numbers only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_doctor.facts import Crash, CrashFacts, ExceptionInfo
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.practice import VLLM_LORA_RANKS

if TYPE_CHECKING:
    from lora_doctor.facts import RunFacts
    from lora_doctor.history import History

__all__ = [
    "CODE",
    "SIGNATURES",
    "SLUG",
    "Crash",
    "CrashFacts",
    "ExceptionInfo",
    "Signature",
    "Verdict",
    "classify",
]

CODE = "LD501"
SLUG = "training-died"


@dataclass(frozen=True)
class Verdict:
    """What a signature's fact check concluded.

    Attributes:
        title: the cause in a few words, for the finding's title.
        cause: the cause in one or two sentences, with the facts that confirm it.
        remedy: the exact fix in one sentence, for the message of a verdict without a
            recommendation (one with a recommendation prints its steps instead).
        fix: the recommendation (``config_changes`` use real ``TrainingArguments`` or
            ``LoraConfig`` field names only).
        support: facts for the cause.
        against: facts that rule it out.
    """

    title: str
    cause: str
    remedy: str
    fix: Recommendation | None
    support: tuple[str, ...] = ()
    against: tuple[str, ...] = ()


#: A signature's fact check: the message's match, the crash and the run's facts -> a verdict.
FactCheck = Callable[["re.Match[str]", Crash, "RunFacts"], Verdict]


@dataclass(frozen=True)
class Signature:
    """One known crash: how to recognise it and how to check its cause against the run.

    Attributes:
        key: a stable name, e.g. ``"pad-token-missing"`` (``evidence.signature``).
        types: exception class names that carry it (matched against the class's MRO).
        pattern: the message the library raises.
        raised_in: where the libraries raise it, as ``"path/suffix.py:function"``.
        check: the fact check.
        evident: the message names the cause by itself: claimed when no fact is against it, even
            if none could be read. Otherwise a fact must support it.
    """

    key: str
    types: frozenset[str]
    pattern: re.Pattern[str]
    raised_in: tuple[str, ...]
    check: FactCheck
    evident: bool

    def match(self, crash: Crash) -> re.Match[str] | None:
        """The pattern's match in the first exception of the chain of a fitting type."""
        for info in crash.exceptions:
            if self.types & set(info.kinds or (info.type.rsplit(".", 1)[-1],)):
                found = self.pattern.search(info.message)
                if found is not None:
                    return found
        return None


# --- the fact checks -----------------------------------------------------------------------------


def _verdict(
    title: str,
    cause: str,
    remedy: str,
    fix: Recommendation | None,
    support: list[str],
    against: list[str],
) -> Verdict:
    return Verdict(title, cause, remedy, fix, tuple(support), tuple(against))


def _n(value: int) -> str:
    return f"{value:,}"


def _pad_token(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    if f.has_tokenizer and f.pad_token is None:
        support.append(f"the collator's tokenizer ({f.tokenizer}) has pad_token=None")
    elif f.pad_token is not None:
        against.append(f"the collator's tokenizer ({f.tokenizer}) has pad_token={f.pad_token!r}")
    choice = (
        f"tokenizer.pad_token = tokenizer.unk_token ({f.unk_token!r}), or tokenizer.eos_token,"
        if f.unk_token
        else "tokenizer.pad_token = tokenizer.eos_token"
    )
    return _verdict(
        "the tokenizer has no pad token",
        "The data collator pads each batch to one length, and its tokenizer has no pad token to pad "
        "with (Llama, Mistral, GPT-2 and Qwen base tokenizers ship without one).",
        f"Set {choice} before building the collator.",
        Recommendation(
            summary="Give the tokenizer a pad token before building the data collator",
            steps=(
                f"Before the collator and the Trainer are built: {choice.rstrip(',')}",
                "Padding is masked by the attention mask, so any existing token works; with "
                "DataCollatorForLanguageModeling a pad token equal to eos_token also hides the real "
                "end-of-sequence tokens from the labels, so prefer another token when the model must "
                "learn to stop",
                "Restart training (nothing was trained)",
            ),
        ),
        support,
        against,
    )


def _token_ids(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    rows = f.num_embeddings
    if f.tokenizer_len is not None and rows is not None:
        if f.tokenizer_len > rows:
            support.append(
                f"the tokenizer has {_n(f.tokenizer_len)} tokens but the input embedding has "
                f"{_n(rows)} rows"
            )
        else:
            against.append(
                f"the tokenizer's {_n(f.tokenizer_len)} tokens fit the embedding's {_n(rows)} rows"
            )
    extra = (f.tokenizer_len or 0) - (rows or 0)
    emb, head = f.embedding_module or "embed_tokens", f.output_module or "lm_head"
    lora = run.has_lora is not False
    steps = (
        (
            "Load the base model, then model.resize_token_embeddings(len(tokenizer)), then "
            "get_peft_model",
            f"The new rows start untrained: train them with LoraConfig(trainable_token_indices="
            f"...) or modules_to_save=['{emb}', '{head}'], and save the tokenizer with the adapter",
        )
        if lora
        else (
            "Call model.resize_token_embeddings(len(tokenizer)) after loading the model, and "
            "save the tokenizer with the model",
        )
    )
    return _verdict(
        "token ids past the embedding (tokens added without resizing)",
        f"Tokens were added to the tokenizer ({_n(max(extra, 0))} past the embedding) but the model's "
        "embedding was not resized: their ids index rows that do not exist (on CPU 'index out of "
        "range in self'; on CUDA a device-side assert, reported at a later call).",
        "Call model.resize_token_embeddings(len(tokenizer)) on the base model before "
        "get_peft_model, and train the new rows.",
        Recommendation(
            summary="Resize the embeddings to the tokenizer"
            + (" before adding LoRA" if lora else ""),
            steps=(*steps, "Restart from step 0 (the model changed)"),
            restart_from_scratch=True,
        ),
        support,
        against,
    )


def _no_trainable(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    if f.trainable_params == 0:
        support.append("no parameter of the model requires grad (0 trainable)")
    elif f.trainable_params:
        against.append(f"{_n(f.trainable_params)} parameters require grad")
    if run.has_lora is False:  # a full fine-tune: no adapter to load trainable
        return _verdict(
            "no parameter requires grad",
            "Nothing in the model is trainable, so the loss has no gradient to follow; this "
            "happens when the model's parameters were frozen (requires_grad_(False)) before "
            "training.",
            "Make the parameters to train require grad again.",
            Recommendation(
                summary="Make the parameters to train require grad",
                steps=(
                    "Remove the code that freezes them, or call model.requires_grad_(True) (or "
                    "on the modules to train) before building the Trainer",
                    "Check sum(p.numel() for p in model.parameters() if p.requires_grad) > 0",
                ),
            ),
            support,
            against,
        )
    return _verdict(
        "no parameter requires grad",
        "Nothing in the model is trainable, so the loss has no gradient to follow; this happens when "
        "an adapter is loaded for inference (PeftModel.from_pretrained without is_trainable=True) or "
        "its weights were frozen.",
        "Load the adapter with PeftModel.from_pretrained(base, path, is_trainable=True), or build it "
        "with get_peft_model.",
        Recommendation(
            summary="Make the adapter trainable",
            steps=(
                "PeftModel.from_pretrained(base_model, adapter_path, is_trainable=True), or "
                "get_peft_model(base_model, lora_config) for a new adapter",
                "Check with model.print_trainable_parameters() that the LoRA weights are trainable",
            ),
        ),
        support,
        against,
    )


def _non_reentrant(f: CrashFacts) -> dict[str, Any]:
    """The arguments that turn on non-reentrant checkpointing, under the installed names."""
    return {f.checkpointing_arg: True, f"{f.checkpointing_arg}_kwargs": {"use_reentrant": False}}


def _checkpointing(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    if f.checkpointing is False:
        against.append("gradient checkpointing is off")
    if f.use_reentrant is False:
        against.append("checkpointing is non-reentrant (use_reentrant=False)")
    if f.input_grads:
        against.append("the input embedding's output already requires grad")
    if f.checkpointing and f.input_grads is False and f.use_reentrant is not False:
        how = "with use_reentrant=True" if f.use_reentrant else "(reentrant)"
        support += [
            f"gradient checkpointing is on {how}",
            "nothing makes the input embeddings' output require grad (no "
            "enable_input_require_grads hook, a frozen embedding)",
        ]
    deepspeed = "loss must be a scalar" in m.group(0)
    kwargs = f"{f.checkpointing_arg}_kwargs"
    return _verdict(
        "reentrant gradient checkpointing with no input that requires grad",
        "With reentrant checkpointing, a checkpointed block is only differentiated when one of its "
        "inputs requires grad; the base model is frozen, so the hidden states entering the blocks "
        "do not, the LoRA layers inside are skipped and the loss has no grad_fn"
        + (" (DeepSpeed's engine.backward asserts a loss with a grad_fn)." if deepspeed else "."),
        f'Set {kwargs}={{"use_reentrant": False}} in TrainingArguments, or call '
        "model.enable_input_require_grads() before training.",
        Recommendation(
            summary="Use non-reentrant checkpointing, or make the inputs require grad",
            steps=(
                f'TrainingArguments({f.checkpointing_arg}=True, {kwargs}={{"use_reentrant": False}})'
                ": non-reentrant checkpointing backpropagates into the blocks whatever their inputs",
                "Or keep reentrant checkpointing and call model.enable_input_require_grads() before "
                "trainer.train() (prepare_model_for_kbit_training does it for 4-bit models)",
                "Restart the run",
            ),
            config_changes=_non_reentrant(f),
        ),
        support,
        against,
    )


def _fp16_weights(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    if f.trainable_fp16_count:
        names = ", ".join(f.trainable_fp16[:3])
        support.append(f"{f.trainable_fp16_count} trainable tensors are float16 (e.g. {names})")
    elif f.trainable_dtypes:
        against.append(f"the trainable tensors are {sorted(f.trainable_dtypes)}, none float16")
    bf16 = f.bf16_supported is True
    steps = [
        "Cast the trainable parameters to float32 after get_peft_model: for p in "
        "model.parameters(): if p.requires_grad: p.data = p.data.float() (get_peft_model keeps new "
        "LoRA weights in float32 with autocast_adapter_dtype=True; modules_to_save copies and "
        "adapters loaded from a float16 checkpoint stay float16)"
        if run.has_lora is not False
        else "Load the model in float32 (torch_dtype=torch.float32): mixed precision keeps the "
        "weights it trains in float32 and computes in float16",
    ]
    if bf16:
        steps.append("Or, on this bfloat16-capable device: bf16=True, fp16=False")
    return _verdict(
        "trainable weights in float16 under fp16=True",
        "fp16=True scales the loss and unscales the gradients of the trainable weights, which must "
        "be float32 (mixed precision keeps float32 master weights); float16 trainable weights give "
        "float16 gradients, which the GradScaler refuses.",
        "Cast the trainable parameters to float32 before training"
        + (", or train with bf16=True, fp16=False." if bf16 else "."),
        Recommendation(
            summary="Keep the trainable weights in float32 with fp16=True",
            steps=tuple(steps),
            config_changes={"fp16": False, "bf16": True} if bf16 else {},
        ),
        support,
        against,
    )


def _ddp_reentrant(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    if (f.world_size or 1) > 1:
        support.append(f"DistributedDataParallel over {f.world_size} processes")
    elif f.world_size == 1:
        against.append("a single process: no DistributedDataParallel")
    if f.checkpointing and f.use_reentrant:
        support.append("gradient checkpointing is on with use_reentrant=True")
    if f.checkpointing is False or f.use_reentrant is False:
        against.append("no reentrant gradient checkpointing")
    if f.ddp_find_unused_parameters:
        support.append("ddp_find_unused_parameters=True")
    changes = _non_reentrant(f)
    if f.ddp_find_unused_parameters:
        changes["ddp_find_unused_parameters"] = False
    weights = "LoRA weights" if run.has_lora is not False else "trainable weights"
    return _verdict(
        "reentrant gradient checkpointing under DistributedDataParallel",
        "Reentrant checkpointing runs a second backward pass per block, so DDP's hooks see the "
        f"{weights} become ready twice in one step (with find_unused_parameters they are also "
        "marked unused first).",
        f'Set {f.checkpointing_arg}_kwargs={{"use_reentrant": False}}'
        + (" and ddp_find_unused_parameters=False." if f.ddp_find_unused_parameters else "."),
        Recommendation(
            summary="Use non-reentrant gradient checkpointing under DDP",
            steps=(
                f"TrainingArguments({f.checkpointing_arg}=True, {f.checkpointing_arg}_kwargs="
                '{"use_reentrant": False})',
                "Or, keeping reentrant checkpointing: ddp_find_unused_parameters=False (every "
                f"{weights.removesuffix('s')} must then get a gradient in every step)",
            ),
            config_changes=changes,
        ),
        support,
        against,
    )


def _device_map_ddp(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    if (f.world_size or 1) > 1:
        support.append(f"{f.world_size} processes train the model")
    if f.device_map:
        support.append(f"the model's hf_device_map places it on {', '.join(f.device_map)}")
    return _verdict(
        "a device_map model in a multi-process run",
        "device_map='auto' (or any device_map with several entries) splits one model over the "
        "devices for a single process; under torchrun or accelerate launch every process needs "
        "its own whole copy on its own device.",
        "Load the model with device_map={'': PartialState().process_index} (from accelerate import "
        "PartialState), or launch one process (python train.py) to split it over the GPUs.",
        _placement_fix(),
        support,
        against,
    )


def _placement_fix() -> Recommendation:
    return Recommendation(
        summary="Load one whole copy of the model per process, on that process's device",
        steps=(
            "from accelerate import PartialState; from_pretrained(..., device_map={'': "
            "PartialState().process_index})",
            "Or, to split one model too large for a GPU over several GPUs, run a single process "
            "(python train.py, not torchrun or accelerate launch) with device_map='auto'",
        ),
    )


def _kbit_placement(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    variant = m.group("variant")
    support = [f"the model is {f.quantization} with bitsandbytes"] if f.quantization else []
    if f.device_map:
        support.append(f"its hf_device_map places it on {', '.join(f.device_map)}")
    if variant.startswith("with CPU or disk offload"):
        return _verdict(
            "part of the quantized model was offloaded to the CPU or disk",
            "device_map='auto' ran out of GPU memory and put layers on the CPU or disk; quantized "
            "layers there cannot be trained.",
            "Make the model fit one GPU (a smaller model, or a GPU with more memory) and load it with "
            "device_map={'': 0}.",
            Recommendation(
                summary="Fit the quantized model on the GPU instead of offloading it",
                steps=(
                    "Load with device_map={'': 0} and check it fits (model.get_memory_footprint())",
                    "If it does not: a smaller base model, or a GPU with more memory",
                ),
            ),
            support,
            [],
        )
    if (f.world_size or 1) > 1:
        support.append(f"{f.world_size} processes train the model")
    return _verdict(
        "the quantized model is on another device than this process trains on",
        "A bitsandbytes model cannot be moved after loading, so it must be loaded on the device of "
        "the process that trains it; device_map='auto' (or a fixed index) put it elsewhere.",
        "Load it with device_map={'': PartialState().process_index} (from accelerate import "
        "PartialState).",
        _placement_fix(),
        support,
        [],
    )


_DTYPE_NAMES = {
    "float": "float32",
    "float32": "float32",
    "double": "float64",
    "float64": "float64",
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
}
_DTYPE_TOKEN = re.compile(
    r"(?<![\w])(?:c10::)?(bfloat16|float16|float32|float64|float|double|half)\b", re.I
)


def _dtypes_in(text: str) -> list[str]:
    found: list[str] = []
    for token in _DTYPE_TOKEN.findall(text):
        name = _DTYPE_NAMES[token.lower()]
        if name not in found:
            found.append(name)
    return found


def _dtype_mismatch(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    named = _dtypes_in(m.group(0))
    held = dict(f.param_dtypes)
    if f.compute_dtype:
        held.setdefault(f.compute_dtype, 0)
    autocast = bool(f.fp16 or f.bf16)
    if len(named) == 2 and all(d in held for d in named):
        counts = ", ".join(f"{held[d]} {d}" for d in named if held[d])
        support.append(
            f"the model holds both dtypes ({counts} tensors"
            + (f", 4-bit compute dtype {f.compute_dtype}" if f.compute_dtype else "")
            + ")"
        )
        if not autocast:
            support.append("training runs without autocast (fp16=False, bf16=False)")
    elif len(held) == 1 and not f.compute_dtype:
        against.append(
            f"every parameter of the model is {next(iter(held))}: the other tensor came from the "
            "inputs or custom code"
        )
    target = "bfloat16" if "bfloat16" in named else "float16" if "float16" in named else None
    changes = {"bf16": True, "fp16": False} if target == "bfloat16" else {"fp16": True}
    arg = "bf16=True" if target == "bfloat16" else "fp16=True"
    return _verdict(
        f"a layer met {' and '.join(named) or 'two dtypes'} tensors (mixed-dtype model)",
        "The model mixes weight dtypes (a module cast to float32, norms upcast by "
        "prepare_model_for_kbit_training, a head kept in float32, or a 4-bit compute dtype other "
        "than the training precision); without autocast a matrix product got an input in one "
        "dtype and weights in the other.",
        f"Train with autocast ({arg} in TrainingArguments), or cast the model to one dtype before "
        "get_peft_model; for a 4-bit base set bnb_4bit_compute_dtype to the training dtype.",
        Recommendation(
            summary=f"Train under autocast ({arg}) or give the model one dtype",
            steps=(
                f"TrainingArguments({arg}): autocast runs each matrix product in one dtype",
                "Or cast the base model to one dtype (model.to(torch.bfloat16)) before get_peft_model",
                "For a 4-bit base: BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16) with "
                "bf16=True (torch.float16 with fp16=True)",
            ),
            config_changes=changes if target else {},
        ),
        support,
        against,
    )


def _device_mismatch(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    named = [m.group("a"), m.group("b")]
    placed = set(f.device_map) | set(f.devices)
    offloaded = sorted(placed & {"cpu", "disk", "meta"})
    accelerators = sorted(d for d in placed if d not in {"cpu", "disk", "meta"})
    if offloaded and accelerators:
        support.append(f"the model is placed on {', '.join(sorted(placed))}")
        title = "part of the model was offloaded to the CPU"
        cause = (
            "device_map put some layers on the CPU (or disk) because the model did not fit the "
            "GPU; training needs every trainable layer and its activations on the GPU."
        )
        remedy = (
            "Fit the model on the GPU: load the base in 4-bit (BitsAndBytesConfig(load_in_4bit=True)) "
            "or use a smaller model, with device_map={'': 0}."
        )
        fix = Recommendation(
            summary="Fit the whole model on the GPU instead of offloading part of it",
            steps=(
                "Load with BitsAndBytesConfig(load_in_4bit=True) and device_map={'': 0}",
                "Or a smaller base model, or a GPU with more memory",
            ),
        )
    elif len(accelerators) > 1:
        support.append(f"the model is split over {', '.join(accelerators)} (device_map)")
        title = "the model is split over several GPUs"
        cause = (
            "device_map split the model over several GPUs (naive model parallelism) and a tensor "
            "made on one GPU reached a layer on another (a module without accelerate's device hook, "
            "or custom code between layers)."
        )
        remedy = (
            "Load one whole copy per GPU (device_map={'': PartialState().process_index} with "
            "torchrun) if the model fits a GPU."
        )
        fix = _placement_fix()
    else:
        if placed:
            against.append(
                f"every parameter is on {', '.join(sorted(placed))}: the tensor on the other device "
                "came from the batch or custom code (a collator, compute_loss or callback)"
            )
        title = "tensors on two devices"
        cause = f"A tensor on {named[0]} met one on {named[1]}."
        remedy = "Keep every tensor of the step on the model's device."
        fix = None
    return _verdict(title, cause, remedy, fix, support, against)


def _vllm_rank(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:

    r, limit = int(m.group("r")), int(m.group("max"))
    fit = next((v for v in VLLM_LORA_RANKS if v >= r), VLLM_LORA_RANKS[-1])
    support = [f"adapter '{a.name}' has r={a.r}" for a in run.adapters.values() if a.r == r]
    return _verdict(
        f"vLLM's max_lora_rank {limit} is below the adapter's r={r}",
        f"The vLLM engine that generates was started with max_lora_rank={limit} and refuses an "
        f"adapter of rank {r}.",
        f"Start vLLM with max_lora_rank={fit}, or train at r<={limit}.",
        Recommendation(
            summary=f"Start vLLM with max_lora_rank={fit}",
            steps=(
                f"Where the vLLM engine is made: vllm serve --max-lora-rank {fit}, "
                f"LLM(max_lora_rank={fit}), or FastLanguageModel.from_pretrained(..., "
                f"max_lora_rank={fit})",
                f"Or train the adapter at r<={limit} (a new run from the base model)",
            ),
        ),
        support,
        [],
    )


def _collective(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    support: list[str] = []
    against: list[str] = []
    world = f.world_size or run.world_size
    if world > 1:
        support.append(f"{world} processes")
    else:
        against.append("a single process")
    first = ""
    for peer in f.peer_reports:
        support.append(
            f"rank {peer.get('rank')} reported: {peer.get('title')} ({peer.get('file')})"
        )
        first = first or f" Rank {peer.get('rank')} died first: {peer.get('title')}."
    timeout = f" (ddp_timeout={f.ddp_timeout} s)" if f.ddp_timeout else ""
    return _verdict(
        "another process of the run stopped taking part in a collective",
        "This process waited in a collective operation (all-reduce, barrier) for a process of the "
        f"run that died, hung, or was still busy past the timeout{timeout}.{first}",
        "Read the other ranks' reports (lora_doctor.rank<N>.json beside this one) and logs: the "
        "first error is the cause.",
        Recommendation(
            summary="Find the rank that failed first; its error is the cause",
            steps=(
                "Read lora_doctor.rank<N>.json beside this report, and each rank's log",
                "If no rank died, one rank was busy longer than ddp_timeout (dataset preprocessing, "
                "saving or evaluation on the main process only): do that work before building the "
                "Trainer, or raise ddp_timeout in TrainingArguments",
            ),
        ),
        support,
        against,
    )


_PADS_LABELS = frozenset({"DataCollatorForSeq2Seq", "DataCollatorForCompletionOnlyLM"})


def _unpadded(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    feature = m.group("feature")
    support: list[str] = []
    against: list[str] = []
    collator = f.data_collator
    if collator in _PADS_LABELS:
        against.append(f"{collator} pads labels")
    elif feature == "labels" and collator:
        support.append(
            f"the batch's labels have different lengths and {collator} pads only what the "
            "tokenizer pads (input_ids, attention_mask)"
        )
    elif collator in {"default_data_collator", "DefaultDataCollator"}:
        support.append(f"{collator} pads nothing, and the rows' {feature} differ in length")
    return _verdict(
        f"the collator does not pad `{feature}`",
        f"The rows of `{feature}` in a batch have different lengths and the data collator does not "
        "pad them, so they cannot be stacked into one tensor.",
        "Use DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100), which pads labels with "
        "-100 (ignored by the loss).",
        Recommendation(
            summary="Use a collator that pads the labels",
            steps=(
                "data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)",
                "Or drop the labels column and use DataCollatorForLanguageModeling(tokenizer, "
                "mlm=False), which makes labels from input_ids",
            ),
        ),
        support,
        against,
    )


def _no_labels(m: re.Match[str], crash: Crash, run: RunFacts) -> Verdict:
    f = crash.facts
    inputs = [s.strip() for s in m.group("inputs").split(",") if s.strip()]
    support: list[str] = []
    against: list[str] = []
    if "labels" in inputs:
        against.append("labels reached the model")
    else:
        support.append(f"the batch holds {', '.join(inputs) or 'no inputs'}: no labels")
    if f.data_collator:
        support.append(f"the data collator is {f.data_collator}")
    return _verdict(
        "the batches have no labels",
        "The model computes a loss only from labels, and the batches carry none: the data collator "
        "does not make them, or remove_unused_columns dropped a column the model's forward does "
        "not name.",
        "For causal LM use DataCollatorForLanguageModeling(tokenizer, mlm=False), which makes "
        "labels from input_ids, or add a labels column.",
        Recommendation(
            summary="Give the batches labels",
            steps=(
                "data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal LM",
                "Or add a labels column; if your labels have another name, set label_names in "
                "TrainingArguments (and remove_unused_columns=False if the collator needs the column)",
            ),
        ),
        support,
        against,
    )


def _sig(
    key: str,
    types: tuple[str, ...],
    pattern: str,
    raised_in: tuple[str, ...],
    check: FactCheck,
    *,
    evident: bool,
) -> Signature:
    return Signature(key, frozenset(types), re.compile(pattern, re.S), raised_in, check, evident)


_LOSS_NO_GRAD = (
    r"element 0 of tensors does not require grad and does not have a grad_fn"
    r"|loss must be a scalar tensor"
)

#: The known crashes, most frequently reported first (evidence: docs/crashes.md).
SIGNATURES: tuple[Signature, ...] = (
    _sig(
        "pad-token-missing",
        ("ValueError",),
        r"Asking to pad but the tokenizer does not have a padding token",
        ("transformers/tokenization_utils_base.py:_get_padding_truncation_strategies",),
        _pad_token,
        evident=True,
    ),
    _sig(
        "fp16-trainable-weights",
        ("ValueError",),
        r"Attempting to unscale FP16 gradients",
        ("torch/amp/grad_scaler.py:_unscale_grads_",),
        _fp16_weights,
        evident=True,
    ),
    _sig(
        "ddp-reentrant-checkpointing",
        ("RuntimeError",),
        r"Expected to mark a variable ready only once",
        ("torch/autograd/graph.py:_engine_run_backward",),
        _ddp_reentrant,
        evident=False,
    ),
    _sig(
        "quantized-model-placement",
        ("ValueError",),
        r"You can't train a model that has been loaded in 8-bit or 4-bit precision "
        r"(?P<variant>on a different device|on multiple devices|with CPU or disk offload)",
        ("accelerate/accelerator.py:prepare_model",),
        _kbit_placement,
        evident=True,
    ),
    _sig(
        "device-map-in-distributed-run",
        ("ValueError",),
        r"You can't train a model that has been loaded with `device_map='auto'` in any "
        r"distributed mode",
        ("accelerate/accelerator.py:prepare_model", "accelerate/accelerator.py:prepare"),
        _device_map_ddp,
        evident=True,
    ),
    _sig(
        "token-id-past-embedding",
        ("IndexError", "RuntimeError"),
        r"index out of range in self|device-side assert triggered|srcIndex < srcSelectDimSize",
        ("torch/nn/functional.py:embedding",),
        _token_ids,
        evident=False,
    ),
    _sig(
        "dtype-mismatch",
        ("RuntimeError",),
        r"expected (?:mat1 and mat2|m1 and m2|both vectors) to have the same dtype[^\n]*"
        r"|(?:self and mat2|mat1 and mat2) must have the same dtype[^\n]*"
        r"|expected scalar type \w+ but found \w+"
        r"|Input type \([^)]*\) and (?:bias|weight) type \([^)]*\) should be the same",
        ("torch/nn/modules/linear.py:forward",),
        _dtype_mismatch,
        evident=False,
    ),
    _sig(
        "no-trainable-parameters",
        ("RuntimeError", "AssertionError"),
        _LOSS_NO_GRAD,
        ("torch/autograd/graph.py:_engine_run_backward", "deepspeed/runtime/engine.py:backward"),
        _no_trainable,
        evident=False,
    ),
    _sig(
        "checkpointing-without-input-grads",
        ("RuntimeError", "AssertionError"),
        _LOSS_NO_GRAD,
        ("torch/autograd/graph.py:_engine_run_backward", "deepspeed/runtime/engine.py:backward"),
        _checkpointing,
        evident=False,
    ),
    _sig(
        "device-mismatch",
        ("RuntimeError",),
        r"Expected all tensors to be on the same device, but (?:found at least two devices, )?"
        r"(?P<a>[\w:]+) and (?P<b>[\w:]+)",
        (),
        _device_mismatch,
        evident=False,
    ),
    _sig(
        "vllm-max-lora-rank",
        ("ValueError", "RuntimeError"),
        r"LoRA rank (?P<r>\d+) is greater than max_lora_rank (?P<max>\d+)",
        ("vllm/lora/worker_manager.py:_load_adapter", "vllm/lora/peft_helper.py:validate_legal"),
        _vllm_rank,
        evident=True,
    ),
    _sig(
        "labels-not-padded",
        ("ValueError",),
        r"Unable to create tensor.*?Perhaps your features \(`(?P<feature>\w+)` in this case\)",
        ("transformers/tokenization_utils_base.py:convert_to_tensors",),
        _unpadded,
        evident=False,
    ),
    _sig(
        "collective-failed",
        ("RuntimeError", "DistError"),
        r"Watchdog caught collective operation timeout|NCCL communicator was aborted"
        r"|Connection closed by peer|Connection reset by peer|Timed out waiting \d+ms for",
        (),
        _collective,
        evident=True,
    ),
    _sig(
        "no-labels",
        ("ValueError",),
        r"The model did not return a loss from the inputs, only the following keys: [^.]*\. "
        r"For reference, the inputs it received are (?P<inputs>[^.]*)\.",
        ("transformers/trainer.py:compute_loss",),
        _no_labels,
        evident=False,
    ),
)


# --- classification ------------------------------------------------------------------------------

_EVAL_FRAMES = frozenset({"evaluate", "evaluation_loop", "prediction_step", "predict"})
#: Functions of the Trainer and accelerate that run before the first step (inside ``train``).
_SETUP_FRAMES = frozenset(
    {
        "prepare",
        "prepare_model",
        "_prepare_one",
        "_wrap_model",
        "create_optimizer",
        "create_optimizer_and_scheduler",
        "get_train_dataloader",
        "_load_from_checkpoint",
    }
)
_STEP_FRAMES = frozenset({"_inner_training_loop", "training_step", "compute_loss"})
#: The Trainer's callback dispatch (``CallbackHandler.call_event``): the frame after it is the hook.
_CALLBACK_FRAME = "call_event"


def _moment(crash: Crash) -> tuple[str, int]:
    """Where in the run it died and the step to report: the step being computed when it died in
    the training loop, else the last completed one (set-up, evaluation, a custom loop)."""
    names = {name for _, name, _ in crash.frames}
    done = crash.completed_steps
    if names & _EVAL_FRAMES:
        return "evaluation", done
    order = [name for _, name, _ in crash.frames]
    if _CALLBACK_FRAME in order:  # a TrainerCallback's hook raised: between steps, not in one
        at = len(order) - 1 - order[::-1].index(_CALLBACK_FRAME)
        hook = next((n for n in order[at + 1 :] if n.startswith("on_")), "hook")  # past wrappers
        return f"a callback's {hook}", done
    if names & _SETUP_FRAMES:
        return "set-up, before the first step", done
    if names & _STEP_FRAMES:
        return "the training step", done + 1
    return "training", done


def _short_path(path: str) -> str:
    path = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _raised_at(crash: Crash, sig: Signature | None) -> str | None:
    """The frame where the library raised it: the innermost frame a signature names, else the
    innermost frame."""
    for file, name, line in reversed(crash.frames):
        short = _short_path(file)
        if sig is not None and any(
            short.endswith(where.split(":")[0]) and name == where.split(":")[1]
            for where in sig.raised_in
        ):
            return f"{short}:{line} ({name})"
    if crash.frames:
        file, name, line = crash.frames[-1]
        return f"{_short_path(file)}:{line} ({name})"
    return None


def last_readings(history: History | None) -> dict[str, dict[str, float]]:
    """The last finite loss, grad norm and learning rate, each with its step.

    Example:
        >>> from lora_doctor.history import History
        >>> last_readings(History.from_log_history([{"step": 4, "loss": 2.5}]))
        {'loss': {'step': 4, 'value': 2.5}}
    """
    out: dict[str, dict[str, float]] = {}
    if history is None:
        return out
    for key in ("loss", "grad_norm", "learning_rate"):
        series = history.series(key).finite()
        if len(series):
            out[key] = {"step": int(series.steps[-1]), "value": float(series.values[-1])}
    return out


def _readings_text(readings: Mapping[str, Mapping[str, float]]) -> str:
    if not readings:
        return "No loss, grad norm or learning rate was logged before it."
    parts = [f"{k} {v['value']:.4g} (step {int(v['step'])})" for k, v in readings.items()]
    return "The doctor's last readings: " + ", ".join(parts) + "."


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line[:300]


def classify(crash: Crash, run: RunFacts, history: History | None = None) -> Finding:
    """The ``training-died`` finding for a crash: its cause and fix when a signature explains it
    and no fact rules the cause out, else what died where, with the last readings, and no guess.

    Args:
        crash: the error and the facts read when it happened.
        run: the run's facts (adapters, world size).
        history: the metrics logged before it (for the last readings).

    Returns:
        A finding with code ``LD501``, slug ``training-died``, severity error, at the step that was
        being computed (the last completed one when it died outside a step). ``evidence.causes``
        lists each signature whose message matched as a cause (``cause``: the signature, ``name``,
        ``verdict``, the facts for it, ``support``, and against it, ``against``), as the causes of
        every other symptom are listed.

    Example:
        >>> from lora_doctor.facts import RunFacts
        >>> crash = Crash.from_exception(KeyError("text"), completed_steps=7)
        >>> classify(crash, RunFacts()).title
        'Training died of KeyError at step 7'
    """
    where, step = _moment(crash)
    error = crash.error
    readings = last_readings(history)
    causes: list[dict[str, Any]] = []
    chosen: tuple[Signature, Verdict] | None = None
    for sig in SIGNATURES:
        found = sig.match(crash)
        if found is None:
            continue
        verdict = sig.check(found, crash, run)
        support = list(verdict.support) or (["the error message names it"] if sig.evident else [])
        causes.append(
            {
                "cause": sig.key,
                "name": verdict.title,
                "verdict": "ruled-out" if verdict.against else "supported" if support else "open",
                "support": support,
                "against": list(verdict.against),
            }
        )
        if chosen is None and not verdict.against and (verdict.support or sig.evident):
            chosen = (sig, verdict)
    raised = _raised_at(crash, chosen[0] if chosen else None)
    line = _first_line(error.message)
    evidence: dict[str, Any] = {
        "exception": error.type,
        "error": error.message,
        "raised_at": raised,
        "where": where,
        "completed_steps": crash.completed_steps,
        "signature": chosen[0].key if chosen else None,
        "causes": causes,
        "last_readings": readings,
    }
    head = f"{crash.type_name} at step {step}, during {where}" + (
        f", raised at {raised}" if raised else ""
    )
    if chosen is None:
        ruled = [c for c in causes if c["against"]]
        note = "".join(
            f" The message matches '{c['name']}', but the run rules it out: "
            f"{'; '.join(c['against'])}."
            for c in ruled
        )
        return Finding(
            code=CODE,
            slug=SLUG,
            severity=Severity.ERROR,
            step=step,
            title=f"Training died of {crash.type_name} at step {step}",
            message=f"{head}: {line!r}.{note} {_readings_text(readings)}",
            evidence=evidence,
            recommendation=None,
        )
    sig, verdict = chosen
    confirm = (
        f"The run confirms it: {'; '.join(verdict.support)}."
        if verdict.support
        else "The message names this cause (the run's objects could not be checked)."
    )
    return Finding(
        code=CODE,
        slug=SLUG,
        severity=Severity.ERROR,
        step=step,
        title=f"Training died at step {step}: {verdict.title}",
        # the remedy is in the message only when no recommendation spells it out
        message=f"{head}: {line!r}. {verdict.cause} {confirm}"
        + (f" {verdict.remedy}" if verdict.fix is None else ""),
        evidence=evidence,
        recommendation=verdict.fix,
    )
