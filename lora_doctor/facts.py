"""What is known about a run: plain data, no torch objects.

The probes fill these from a live model; the offline doctor fills what it can from the files a run
saved (``adapter_config.json``, ``trainer_state.json``). Every field has a neutral default meaning
"not known", and the checks stay quiet about what is not known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "SPECTRUM_DIGITS",
    "AdapterFacts",
    "Crash",
    "CrashFacts",
    "ExceptionInfo",
    "LayerFacts",
    "LayerSpectrum",
    "MemoryFacts",
    "OverheadFacts",
    "RunFacts",
    "SetupFacts",
    "SpectrumSnapshot",
    "derive_facts",
    "is_rl_key",
    "precision_in_use",
]


@dataclass
class AdapterFacts:
    """One named LoRA adapter's configuration (peft's ``LoraConfig``), as plain data."""

    name: str = "default"
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_dropout: float | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model: str | None = None

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> AdapterFacts:
        """Reads the fields of a LoRA config dict (``adapter_config.json`` or ``LoraConfig.to_dict()``);
        unknown keys are ignored, missing ones keep their defaults, and a field of the wrong type
        is "not known" (see :meth:`parse_config`)."""
        return cls.parse_config(name, config)[0]

    @classmethod
    def parse_config(cls, name: str, config: Mapping[str, Any]) -> tuple[AdapterFacts, list[str]]:
        """Reads a LoRA config dict strictly, by the types of peft's ``LoraConfig``.

        A field of the wrong type is left at its default ("not known") and described in the
        returned problems: ``r`` must be a positive integer, ``lora_alpha`` and ``lora_dropout``
        finite numbers, ``use_rslora`` and ``use_dora`` true or false (the string ``"false"`` is
        not false: peft would take it as true), ``init_lora_weights`` a boolean or a name,
        ``target_modules`` a name or a list of names, ``rank_pattern`` an object of positive
        integers, ``alpha_pattern`` an object of finite numbers, ``modules_to_save`` a list of
        names, ``bias``, ``task_type`` and ``base_model_name_or_path`` text. ``null`` is the
        default everywhere.

        Returns:
            The facts, and one line per field of the wrong type (empty when all are well formed).

        Example:
            >>> facts, problems = AdapterFacts.parse_config("default", {"r": 8, "use_rslora": "no"})
            >>> facts.r, facts.use_rslora, problems
            (8, False, ["use_rslora must be true or false, got 'no'"])
        """
        problems: list[str] = []
        values = dict(config)
        if isinstance(values.get("target_modules"), (set, frozenset, tuple)):  # a live LoraConfig's
            values["target_modules"] = sorted(values["target_modules"], key=str)

        def read(key: str, ok: Callable[[Any], bool], rule: str, default: Any = None) -> Any:
            value = values.get(key)
            if value is None:
                return default
            if ok(value):
                return value
            problems.append(f"{key} must be {rule}, got {value!r:.40}")
            return default

        r = read("r", _is_count, "a positive integer")
        alpha = read("lora_alpha", _is_number, "a finite number")
        dropout = read("lora_dropout", _is_number, "a finite number")
        return cls(
            name=name,
            r=int(r) if r is not None else None,
            lora_alpha=float(alpha) if alpha is not None else None,
            use_rslora=read("use_rslora", _is_bool, "true or false", False),
            use_dora=read("use_dora", _is_bool, "true or false", False),
            init_lora_weights=read(
                "init_lora_weights", _is_bool_or_text, "true, false or a method name", True
            ),
            target_modules=read(
                "target_modules",
                lambda v: isinstance(v, str) or _is_names(v),
                "a module name (or pattern) or a list of names",
            ),
            rank_pattern={
                str(k): int(v)
                for k, v in read(
                    "rank_pattern",
                    lambda v: _is_table(v, _is_count),
                    "an object of module names to positive integers",
                    {},
                ).items()
            },
            alpha_pattern={
                str(k): float(v)
                for k, v in read(
                    "alpha_pattern",
                    lambda v: _is_table(v, _is_number),
                    "an object of module names to finite numbers",
                    {},
                ).items()
            },
            lora_dropout=float(dropout) if dropout is not None else None,
            bias=read("bias", _is_text, "text (none, all or lora_only)", "none"),
            modules_to_save=list(read("modules_to_save", _is_names, "a list of names", [])) or None,
            task_type=read("task_type", _is_text, "text"),
            base_model=read("base_model_name_or_path", _is_text, "text"),
        ), problems


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool; an int too large for a float is not finite)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_count(v: Any) -> bool:
    """A positive whole number (``8`` or ``8.0``) that a float can hold."""
    return _is_number(v) and v > 0 and float(v).is_integer()


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool_or_text(v: Any) -> bool:
    return isinstance(v, (bool, str))


def _is_names(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v)


def _is_table(v: Any, ok: Callable[[Any], bool]) -> bool:
    return isinstance(v, Mapping) and all(isinstance(k, str) and ok(x) for k, x in v.items())


@dataclass
class LayerFacts:
    """One LoRA-wrapped module for one adapter.

    Shapes are the true (logical) shapes, also under DeepSpeed ZeRO-3 and FSDP where the local
    tensor is a shard or a flat buffer. ``d_in``/``d_out`` are the base layer's features.
    ``zero_norm_rows``: for a DoRA layer read before training, how many rows of its weight have
    norm 0 (entries of DoRA's magnitude vector that are exactly 0, on which DoRA divides 0 by 0);
    None when unknown (not DoRA, or a sharded magnitude).
    """

    name: str
    adapter: str = "default"
    kind: str = ""
    r: int = 0
    lora_alpha: float = 0.0
    scaling: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    d_in: int | None = None
    d_out: int | None = None
    a_shape: tuple[int, ...] | None = None
    b_shape: tuple[int, ...] | None = None
    base_type: str = ""
    fan_in_fan_out: bool = False
    base_numel: int = 0
    active: bool = True
    zero_norm_rows: int | None = None


@dataclass
class MemoryFacts:
    """The accelerator's memory, as the memory probe saw it (bytes throughout).

    Filled at the start of training (device, capacity, weights, trainable parameters), after the
    first steps (the measured static memory, peak and optimizer states), and when training dies of
    out-of-memory (``oom``). ``lora_doctor.memory_estimate`` turns it into an estimate by component.

    Attributes:
        available: False when there is no CUDA device to read (the memory checks are then off,
            said in one INFO log line).
        reason: why the memory checks are off, when they are (e.g. "torch 2.13.0 sees no CUDA
            device").
        device: the device read, e.g. ``"cuda:0"``.
        capacity: total memory of the device.
        ranks: processes whose readings were combined (the worst of each figure is kept).
        weights_by_dtype: bytes of frozen model parameters by storage type ("4-bit", "8-bit",
            "bf16", "fp16", "fp32" ...), as stored on the device.
        trainable_numel: elements of trainable parameters (LoRA and ``modules_to_save``).
        trainable_bytes: their bytes (their gradients take as much).
        lora_bytes: bytes of the LoRA parameters among them (the part that scales with r).
        r: the rank the LoRA figures were measured at (the most common one).
        optimizer: the optimizer's class name.
        optimizer_state_bytes: bytes of optimizer states, measured after the first steps (None
            before; the estimate then predicts them from the optimizer's kind).
        static_bytes: memory allocated between steps after the first steps (weights, states).
        first_peak_bytes: the allocator's peak after the first steps (never reset by the doctor:
            it covers anything earlier in the process too, such as loading the model).
        outside_bytes: device memory held outside PyTorch's allocator (CUDA context, other
            processes), at the last reading.
        peak_bytes: the highest peak allocated of all readings (of the worst rank): the
            allocator's peak, as ``torch.cuda.max_memory_allocated()`` reports it.
        last_reading: this rank's last reading, in GiB (peak, reserved, free, retries ...).
        per_device_train_batch_size: the batch size per device.
        gradient_accumulation_steps: the accumulation steps.
        estimates: the estimate by component for r, 2r and r/2, keyed by rank (strings, for JSON).
        oom: the figures when training died of out-of-memory: step, where, error, reading.
    """

    available: bool = False
    reason: str = ""
    device: str | None = None
    capacity: int | None = None
    ranks: int = 1
    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    trainable_numel: int = 0
    trainable_bytes: int = 0
    lora_bytes: int = 0
    r: int | None = None
    optimizer: str | None = None
    optimizer_state_bytes: int | None = None
    static_bytes: int | None = None
    first_peak_bytes: int | None = None
    outside_bytes: int = 0
    peak_bytes: int | None = None
    last_reading: dict[str, Any] | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)
    oom: dict[str, Any] | None = None


#: Significant digits of the spectrum readings' numbers in the diagnosis JSON and in checkpoints
#: (singular values, ranks and ratios; float32 arithmetic carries about 7).
SPECTRUM_DIGITS = 4


@dataclass
class LayerSpectrum:
    """The learned update ``scaling * B @ A`` of one LoRA layer at one moment, as plain numbers.

    Attributes:
        name: the module's name.
        kind: the module kind (``q_proj``, ``down_proj`` ...): the last part of the name.
        adapter: the adapter's name.
        r: the layer's rank.
        singular_values: of ``scaling * B @ A``, largest first (``min(r, d_out, d_in)`` values).
        b_norm: Frobenius norm of ``B``.
        relative_update: ``||scaling * B @ A||_F / ||W||_F`` against the frozen base weight; None
            when the base weight could not be read.
        init_nonzero: ``B`` was not zero at the start (PiSSA, OLoRA, LoftQ ... inits): the product
            then holds the initialisation, not only what was learned.
    """

    name: str
    kind: str
    adapter: str = "default"
    r: int = 0
    singular_values: list[float] = field(default_factory=list)
    b_norm: float = 0.0
    relative_update: float | None = None
    init_nonzero: bool = False


@dataclass
class SpectrumSnapshot:
    """The spectra of the learned updates at one optimizer step.

    Attributes:
        step: the optimizer step.
        kinds: per module kind, a summary (median effective rank, stable rank, used rank, smallest
            over largest singular value, relative update, norm of B, normalised spectrum ...).
        layers: the spectrum of every layer read; kept for the latest snapshot only, older ones
            keep their ``kinds`` summary without its normalised ``spectrum`` list.
        layers_read: how many layers this reading read (fewer than ``layers_total`` when the
            time budget asked for a subset; the subsets rotate so that every layer gets read).
        layers_total: the LoRA layers the model has (0 when unknown).
    """

    step: int
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: list[LayerSpectrum] = field(default_factory=list)
    layers_read: int = 0
    layers_total: int = 0


@dataclass
class OverheadFacts:
    """What the doctor spent of a live run's time, against its time budget.

    Attributes:
        time_budget: the share of the training's wall time the doctor may spend
            (``DoctorConfig.time_budget``; None: no limit).
        wall_seconds: the training's wall time from the start of training to the doctor's latest
            hook (evaluations included).
        doctor_seconds: the time spent inside the doctor's hooks: the start-up walk of the model,
            the first-steps checks, every per-step hook and the spectrum readings.
        waited_seconds: time the hooks waited for the training's own queued device work before
            reading tensors, left out of ``doctor_seconds``.
        spectrum_seconds: of which the spectrum probe's (its start-up and its readings).
        spectrum_layer_seconds: the latest measured cost of reading one layer's spectrum.
        spectrum_planned: spectrum readings the schedule planned so far (every
            ``spectrum_every_steps`` and the end).
        spectrum_skipped: planned readings not taken: the budget could not fit
            ``spectrum_min_layers`` layers (each snapshot says how many layers it read).
    """

    time_budget: float | None = None
    wall_seconds: float = 0.0
    doctor_seconds: float = 0.0
    waited_seconds: float = 0.0
    spectrum_seconds: float = 0.0
    spectrum_layer_seconds: float | None = None
    spectrum_planned: int = 0
    spectrum_skipped: int = 0


# --- the error that ended training -----------------------------------------------------------
#: A traceback frame as plain data: (file, function, line).
Frame = tuple[str, str, int]

#: Frames kept per crash (the innermost ones) and characters kept per message.
_MAX_FRAMES = 24
_MAX_MESSAGE = 2000
_MAX_CHAIN = 4


@dataclass
class ExceptionInfo:
    """One exception of the chain that ended training, as plain data.

    Attributes:
        type: the qualified class name, e.g. ``"builtins.ValueError"``.
        kinds: the class names of its MRO (``("AcceleratorError", "RuntimeError")``), so that a
            signature written for ``RuntimeError`` also matches its subclasses.
        message: ``str(exc)``, cut at 2,000 characters.
    """

    type: str
    kinds: tuple[str, ...] = ()
    message: str = ""


@dataclass
class CrashFacts:
    """What the Trainer's objects told when training died; None (or empty) where not known.

    Filled by :func:`lora_doctor.probes.crash.gather_crash_facts`, which never raises: a fact it
    could not read stays unknown, and a signature that needs it stays unconfirmed.

    Attributes:
        tokenizer: class of the tokenizer that pads (the data collator's, else the Trainer's
            ``processing_class``).
        tokenizer_len: ``len(tokenizer)``: its vocabulary with added tokens.
        pad_token: its pad token (None: it has none; see ``has_tokenizer``).
        eos_token: its end-of-sequence token.
        unk_token: its unknown token.
        has_tokenizer: True when a tokenizer was found at all.
        num_embeddings: rows of the model's input embedding (``get_input_embeddings()``).
        vocab_size: ``config.vocab_size``.
        embedding_module: the input embedding's module name (``embed_tokens``).
        output_module: the output embedding's module name (``lm_head``).
        model_class: the model's class (the PEFT wrapper's base model).
        trainable_params: elements of parameters with ``requires_grad`` (true size under ZeRO-3).
        trainable_dtypes: dtype name -> number of trainable tensors.
        trainable_fp16: names of trainable float16 tensors (the first five).
        trainable_fp16_count: how many trainable tensors are float16.
        param_dtypes: floating dtype name -> number of parameter tensors (frozen and trainable).
        devices: the distinct devices the parameters are on.
        device_map: the distinct devices of the model's ``hf_device_map`` (empty when it has none).
        checkpointing: True when a module of the model has gradient checkpointing on.
        use_reentrant: the ``use_reentrant`` the model's checkpoint function passes to torch.
        input_grads: True when the input embedding's output requires grad (the hook of
            ``enable_input_require_grads``, or a trainable embedding).
        checkpointing_arg: the ``TrainingArguments`` field that turns checkpointing on
            (``activation_checkpointing`` in transformers 5, ``gradient_checkpointing`` before).
        fp16: ``TrainingArguments.fp16``.
        bf16: ``TrainingArguments.bf16``.
        bf16_supported: whether the device runs bfloat16 (CUDA: compute capability 8.0 and up).
        quantization: ``"4-bit"`` or ``"8-bit"`` for a bitsandbytes base model.
        compute_dtype: the 4-bit base's ``bnb_4bit_compute_dtype``.
        data_collator: the Trainer's data collator (class or function name).
        world_size: processes in the run.
        rank: this process's global rank.
        ddp_timeout: ``TrainingArguments.ddp_timeout`` in seconds.
        ddp_find_unused_parameters: ``TrainingArguments.ddp_find_unused_parameters``.
        peer_reports: other ranks' reports of this run found beside this one, each
            ``{"rank", "file", "title"}`` (the first to die wrote one).
    """

    tokenizer: str | None = None
    tokenizer_len: int | None = None
    pad_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    has_tokenizer: bool = False
    num_embeddings: int | None = None
    vocab_size: int | None = None
    embedding_module: str | None = None
    output_module: str | None = None
    model_class: str | None = None
    trainable_params: int | None = None
    trainable_dtypes: dict[str, int] = field(default_factory=dict)
    trainable_fp16: list[str] = field(default_factory=list)
    trainable_fp16_count: int = 0
    param_dtypes: dict[str, int] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    device_map: list[str] = field(default_factory=list)
    checkpointing: bool | None = None
    use_reentrant: bool | None = None
    input_grads: bool | None = None
    checkpointing_arg: str = "gradient_checkpointing"
    fp16: bool | None = None
    bf16: bool | None = None
    bf16_supported: bool | None = None
    quantization: str | None = None
    compute_dtype: str | None = None
    data_collator: str | None = None
    world_size: int | None = None
    rank: int | None = None
    ddp_timeout: int | None = None
    ddp_find_unused_parameters: bool | None = None
    peer_reports: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Crash:
    """The error that ended training, as plain data (kept in ``RunFacts.crash``).

    Attributes:
        exceptions: the exception that escaped first, then the ones it was raised from
            (``__cause__``/``__context__``), at most four.
        frames: the escaping exception's traceback as (file, function, line), innermost last
            (the 24 innermost frames).
        completed_steps: optimizer steps finished before the error (``state.global_step``).
        facts: what the Trainer's objects told at that moment.
    """

    exceptions: list[ExceptionInfo]
    frames: list[Frame] = field(default_factory=list)
    completed_steps: int = 0
    facts: CrashFacts = field(default_factory=CrashFacts)

    @classmethod
    def from_exception(
        cls, exc: BaseException, completed_steps: int, facts: CrashFacts | None = None
    ) -> Crash:
        """Reads an exception (and the chain it was raised from) into plain data.

        Example:
            >>> crash = Crash.from_exception(ValueError("bad batch"), completed_steps=3)
            >>> crash.exceptions[0].type, crash.completed_steps
            ('builtins.ValueError', 3)
        """
        chain: list[ExceptionInfo] = []
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
            seen.add(id(current))
            kind = type(current)
            chain.append(
                ExceptionInfo(
                    type=f"{kind.__module__}.{kind.__qualname__}",
                    kinds=tuple(
                        k.__name__
                        for k in kind.__mro__
                        if k not in (object, BaseException, Exception)
                    ),
                    message=_text(current)[:_MAX_MESSAGE],
                )
            )
            current = current.__cause__ or current.__context__
        return cls(chain, _frames(exc.__traceback__), int(completed_steps), facts or CrashFacts())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Crash:
        """Reads a crash back from ``dataclasses.asdict`` form; unknown keys are ignored."""
        known = {f.name for f in fields(CrashFacts)}
        facts = data.get("facts") if isinstance(data.get("facts"), Mapping) else {}
        return cls(
            exceptions=[
                ExceptionInfo(
                    type=str(e.get("type", "")),
                    kinds=tuple(str(k) for k in e.get("kinds") or ()),
                    message=str(e.get("message", "")),
                )
                for e in data.get("exceptions") or ()
                if isinstance(e, Mapping)
            ],
            frames=[
                (str(f[0]), str(f[1]), int(f[2]))
                for f in data.get("frames") or ()
                if isinstance(f, (list, tuple)) and len(f) == 3
            ],
            completed_steps=int(data.get("completed_steps") or 0),
            facts=CrashFacts(**{k: v for k, v in facts.items() if k in known}),  # type: ignore[union-attr]
        )

    @property
    def error(self) -> ExceptionInfo:
        """The exception that escaped ``train``."""
        return self.exceptions[0] if self.exceptions else ExceptionInfo("builtins.Exception")

    @property
    def type_name(self) -> str:
        """The escaping exception's class name without its module (``ValueError``)."""
        return self.error.type.rsplit(".", 1)[-1]


def _text(exc: BaseException) -> str:
    """``str(exc)``, or its ``repr`` when its ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return object.__repr__(exc)


def _frames(tb: TracebackType | None) -> list[Frame]:
    frames: list[Frame] = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((code.co_filename, code.co_name, int(tb.tb_lineno)))
        tb = tb.tb_next
    return frames[-_MAX_FRAMES:]


@dataclass
class SetupFacts:
    """How the run is set up: what the causes of a symptom are judged against and what their fixes
    are built from. Every field may be unknown (None or empty), offline above all.

    Attributes:
        optimizer: the optimizer: ``TrainingArguments.optim`` (``"adamw_torch"``,
            ``"paged_adamw_8bit"`` ...) or the optimizer's class name (``"AdamW"``, ``"SGD"``).
        lr_scheduler_type: the schedule (``"linear"``, ``"cosine"``, ``"constant_with_warmup"`` ...).
        warmup_steps: optimizer steps of warm-up (from ``warmup_steps`` or ``warmup_ratio``).
        max_grad_norm: gradient clipping's threshold (0 or None: no clipping).
        weight_decay: the optimizer's weight decay.
        fp16, bf16: the mixed-precision flags of the arguments.
        trainable_dtypes: dtypes of the trainable parameters (``"float32"``, ``"float16"`` ...).
        base_dtypes: storage types of the frozen weights (``"bf16"``, ``"4-bit"`` ...).
        precision: the precision the forward pass computes in (derived by the engine):
            ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        vocab_size: the model's vocabulary (``config.vocab_size``).
        loss_at_chance: ``ln(vocab_size)``, the cross-entropy of a uniform guess (derived).
        hidden_size: the model's width (``config.hidden_size``, of the text model in a multimodal
            one): LoRA's usual learning rates depend on it (:func:`lora_doctor.practice.lr_range`).
        module_kinds: the kinds of linear (and Conv1D) modules the model has, as peft's
            ``target_modules`` name them (``q_proj``, ``gate_proj`` ...; GPT-2: ``c_attn``, ``c_fc``,
            ``c_proj``), in model order.
        gradient_checkpointing: whether gradient checkpointing is on.
        use_reentrant: its ``use_reentrant`` setting (None: the library's default).
        logging_steps: steps between logs.
        save_strategy: ``"steps"``, ``"epoch"``, ``"best"`` or ``"no"``.
        save_steps: steps between checkpoints under ``save_strategy="steps"``.
        checkpoint_steps: steps of the checkpoints found in the output folder.
        metric_for_best_model: the metric the run keeps its best checkpoint by.
        greater_is_better: whether that metric improves upward.
        output_dir: the run's output folder.
    """

    optimizer: str | None = None
    lr_scheduler_type: str | None = None
    warmup_steps: int | None = None
    max_grad_norm: float | None = None
    weight_decay: float | None = None
    fp16: bool | None = None
    bf16: bool | None = None
    trainable_dtypes: list[str] = field(default_factory=list)
    base_dtypes: list[str] = field(default_factory=list)
    precision: str | None = None
    vocab_size: int | None = None
    loss_at_chance: float | None = None
    hidden_size: int | None = None
    module_kinds: list[str] = field(default_factory=list)
    gradient_checkpointing: bool | None = None
    use_reentrant: bool | None = None
    logging_steps: int | None = None
    save_strategy: str | None = None
    save_steps: int | None = None
    checkpoint_steps: list[int] = field(default_factory=list)
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    output_dir: str | None = None


@dataclass
class RunFacts:
    """Everything the checks may know about a run besides its metric history.

    Attributes:
        has_lora: True/False once known, None when nothing told (offline without adapter_config).
        adapters: the adapters' configurations, by name.
        layers: one entry per (LoRA module, adapter).
        lora_params: LoRA parameters (A, B, DoRA magnitudes, embeddings), counted at true size.
        lora_params_by_adapter: the same, by adapter name.
        trainable_lora_params: LoRA parameters with ``requires_grad``.
        base_params: parameters of the base model, without LoRA and without modules_to_save copies;
            4-bit weights at their true element count.
        trainable_params: parameters with ``requires_grad``.
        trainable_base: names of base (non-LoRA, non-modules_to_save) parameters that are trainable.
        trainable_base_params: their element count.
        not_in_optimizer: names of trainable LoRA parameters that no optimizer param group holds.
        no_grad_layers: LoRA modules whose A and B got no gradient in the first steps (none, or
            only zeros).
        zero_grad_layers: those of ``no_grad_layers`` whose gradient was there at every step but
            exactly zero (not None): the graph reaches them, the loss carried no signal (an online
            RL step whose completions all got the same reward). Not told apart under DeepSpeed,
            whose gradient buffers read zero where no gradient arrived.
        b_still_zero_layers: LoRA modules whose B is still exactly zero after the first steps.
        frozen_in_place: LoRA modules whose weights did not change at all in the first steps (only
            judged when some step had a positive learning rate and finite gradients).
        max_steps: the run's planned number of optimizer steps (0 when unknown).
        num_train_epochs: planned epochs.
        train_examples: examples in the training set, when the Trainer knows.
        learning_rate: the configured peak learning rate.
        world_size: number of processes.
        is_rl: True for reinforcement-learning or preference runs (GRPO, DPO, ORPO ...): from the
            trainer's class, or derived by the engine from the metrics only those trainers log.
        rl_keys: the logged metrics that told the run is RL (derived by the engine).
        trainer: the trainer class's name.
        device_total_memory: bytes of the accelerator's memory, when there is one.
        resumed_from: the checkpoint folder a resumed run started from.
        checkpoint_adapters: the adapters' configurations as that checkpoint saved them (its
            ``adapter_config.json``), by name.
        vllm_max_lora_rank: the largest LoRA rank the vLLM engine that serves generations accepts
            (its ``max_lora_rank``), when the run generates through vLLM with LoRA.
        memory: what the memory probe read (None when no probe ran, e.g. offline).
        crash: the error that ended training and what the Trainer's objects told at that moment
            (None when training did not die, or died of out-of-memory, recorded in ``memory.oom``).
        saved_global_step: offline, the ``global_step`` of the trainer state read (None live).
        saved_checkpoint: offline, the ``checkpoint-N`` folder the trainer state was read from
            (None when it is a run's own state).
        spectrum: snapshots of the learned updates' spectra, oldest first (the spectrum probe).
        spectrum_notes: why the spectrum could not be read for some layers (4-bit base without
            bitsandbytes, FSDP1 flat parameters ...).
        overhead: what the doctor spent of a live run's time, against its budget (None offline).
        supervised_tokens: tokens of the training set with a label other than -100 (estimated
            from a sample when the set is large); None when unknown (an iterable dataset).
        supervised_tokens_sampled: True when ``supervised_tokens`` is extrapolated from a sample.
        setup: the training set-up the causes and their fixes are read from (optimizer, schedule,
            precision, checkpoints, the model's module names ...).
        extra: facts added by probes that have no field yet (plain JSON-able data).
    """

    has_lora: bool | None = None
    adapters: dict[str, AdapterFacts] = field(default_factory=dict)
    layers: list[LayerFacts] = field(default_factory=list)
    lora_params: int = 0
    lora_params_by_adapter: dict[str, int] = field(default_factory=dict)
    trainable_lora_params: int = 0
    base_params: int = 0
    trainable_params: int = 0
    trainable_base: list[str] = field(default_factory=list)
    trainable_base_params: int = 0
    not_in_optimizer: list[str] = field(default_factory=list)
    no_grad_layers: list[str] = field(default_factory=list)
    zero_grad_layers: list[str] = field(default_factory=list)
    b_still_zero_layers: list[str] = field(default_factory=list)
    frozen_in_place: list[str] = field(default_factory=list)
    max_steps: int = 0
    num_train_epochs: float | None = None
    train_examples: int | None = None
    learning_rate: float | None = None
    world_size: int = 1
    is_rl: bool = False
    rl_keys: list[str] = field(default_factory=list)
    trainer: str | None = None
    device_total_memory: int | None = None
    # --- multigpu / ecosystem ---
    resumed_from: str | None = None
    checkpoint_adapters: dict[str, AdapterFacts] = field(default_factory=dict)
    vllm_max_lora_rank: int | None = None
    memory: MemoryFacts | None = None
    crash: Crash | None = None
    saved_global_step: int | None = None
    saved_checkpoint: str | None = None
    # --- rank ---
    spectrum: list[SpectrumSnapshot] = field(default_factory=list)
    spectrum_notes: list[str] = field(default_factory=list)
    overhead: OverheadFacts | None = None
    supervised_tokens: int | None = None
    supervised_tokens_sampled: bool = False
    setup: SetupFacts = field(default_factory=SetupFacts)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The facts as JSON-able data (the diagnosis file's ``run`` block and a checkpoint's
        saved doctor state build on it). The spectrum readings' numbers keep
        :data:`SPECTRUM_DIGITS` significant digits.

        Example:
            >>> snap = SpectrumSnapshot(step=4, kinds={"q_proj": {"effective_rank": 7.123456}})
            >>> RunFacts(spectrum=[snap]).to_dict()["spectrum"][0]["kinds"]
            {'q_proj': {'effective_rank': 7.123}}
        """
        data = asdict(self)
        data["spectrum"] = _significant(data["spectrum"], SPECTRUM_DIGITS)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunFacts:
        """Reads facts back from :meth:`to_dict`'s form (e.g. a checkpoint's saved doctor state).

        Unknown keys are ignored and missing ones keep their defaults; shapes come back as tuples.

        Example:
            >>> RunFacts.from_dict(RunFacts(lora_params=8).to_dict()).lora_params
            8
        """
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("adapters", "checkpoint_adapters"):
            if isinstance(values.get(key), Mapping):
                values[key] = {
                    str(name): _dataclass_from(AdapterFacts, cfg)
                    for name, cfg in values[key].items()
                    if isinstance(cfg, Mapping)
                }
        if isinstance(values.get("memory"), Mapping):
            values["memory"] = _dataclass_from(MemoryFacts, values["memory"])
        if isinstance(values.get("overhead"), Mapping):
            values["overhead"] = _dataclass_from(OverheadFacts, values["overhead"])
        if isinstance(values.get("setup"), Mapping):
            values["setup"] = _dataclass_from(SetupFacts, values["setup"])
        elif "setup" in values:
            del values["setup"]
        if isinstance(values.get("crash"), Mapping):
            values["crash"] = Crash.from_dict(values["crash"])
        if isinstance(values.get("layers"), list):
            values["layers"] = [
                _dataclass_from(LayerFacts, lf)
                for lf in values["layers"]
                if isinstance(lf, Mapping)
            ]
        if isinstance(values.get("spectrum"), list):
            values["spectrum"] = [
                SpectrumSnapshot(
                    step=int(snap.get("step", 0)),
                    kinds=dict(snap.get("kinds") or {}),
                    layers=[
                        _dataclass_from(LayerSpectrum, lay)
                        for lay in snap.get("layers") or []
                        if isinstance(lay, Mapping)
                    ],
                    layers_read=int(snap.get("layers_read") or 0),
                    layers_total=int(snap.get("layers_total") or 0),
                )
                for snap in values["spectrum"]
                if isinstance(snap, Mapping)
            ]
        return cls(**values)


#: Keys that only reinforcement-learning and preference trainers log (TRL's GRPO, PPO, DPO, ORPO,
#: KTO, RLOO): rewards, log-probabilities, KL, clipping ratios, completion statistics.
_RL_KEYS = frozenset({"reward", "reward_std", "kl", "frac_reward_zero_std", "odds_ratio_loss"})
_RL_PREFIXES = (
    "rewards/",
    "reward/",
    "logps/",
    "logits/chosen",
    "logits/rejected",
    "completions/",
    "clip_ratio",
    "objective/",
    "policy/",
    "kl/",
)


def is_rl_key(key: str) -> bool:
    """True for a metric only RL or preference trainers log (``eval_`` prefix ignored).

    Example:
        >>> is_rl_key("rewards/chosen"), is_rl_key("eval_kl"), is_rl_key("loss")
        (True, True, False)
    """
    key = key.removeprefix("eval_")
    return key in _RL_KEYS or key.startswith(_RL_PREFIXES)


def derive_facts(facts: RunFacts, keys: Iterable[str]) -> RunFacts:
    """Derives, in place, the facts the engine computes once for every check from the keys the
    run has logged: whether it is RL or preference training (``is_rl``, ``rl_keys``).

    Called by the engine before the checks of a look whenever the history has new keys; checks
    never write facts.

    Example:
        >>> derive_facts(RunFacts(), ["loss", "rewards/chosen"]).is_rl
        True
    """
    if not facts.rl_keys:
        rl_keys = [k for k in keys if isinstance(k, str) and is_rl_key(k)]
        if rl_keys:
            facts.rl_keys = rl_keys
            facts.is_rl = True
    setup = facts.setup
    setup.precision = precision_in_use(setup)
    if setup.vocab_size and setup.vocab_size > 1:
        setup.loss_at_chance = math.log(setup.vocab_size)
    return facts


def precision_in_use(setup: SetupFacts) -> str | None:
    """The precision the forward pass computes in: the mixed-precision flag, else the dtype of the
    trainable parameters; None when neither is known.

    Example:
        >>> precision_in_use(SetupFacts(fp16=True)), precision_in_use(SetupFacts(trainable_dtypes=["float32"]))
        ('fp16', 'fp32')
    """
    if setup.bf16:
        return "bf16"
    if setup.fp16:
        return "fp16"
    names = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    dtypes = {names.get(d, d) for d in setup.trainable_dtypes}
    if len(dtypes) == 1:
        return dtypes.pop()
    return None


_T = TypeVar("_T")


def _significant(value: Any, digits: int) -> Any:
    """``value`` with every finite float rounded to ``digits`` significant digits (in dicts and
    lists too)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _significant(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_significant(v, digits) for v in value]
    return value


def _dataclass_from(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """A dataclass from a dict of its fields: unknown keys ignored, lists of ints made tuples where
    the field holds a shape."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in data.items() if k in known}
    for key in ("a_shape", "b_shape"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return cls(**values)
