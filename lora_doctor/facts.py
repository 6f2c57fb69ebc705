"""What is known about a run: plain data, no torch objects.

The probes fill these from a live model; the offline doctor fills what it can from the files a run
saved (``adapter_config.json``, ``trainer_state.json``). Every field has a neutral default meaning
"not known", and the checks stay quiet about what is not known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

__all__ = [
    "AdapterFacts",
    "LayerFacts",
    "LayerSpectrum",
    "MemoryFacts",
    "RunFacts",
    "SpectrumSnapshot",
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
        peaks_reset: True when each reading's peak covers only the interval since the previous
            reading (False when the Trainer's own memory metrics need the peak since the start).
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
        first_peak_bytes: peak allocated memory during the first steps.
        outside_bytes: device memory held outside PyTorch's allocator (CUDA context, other
            processes), at the last reading.
        peak_bytes: the highest peak allocated of all readings (of the worst rank).
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
    peaks_reset: bool = True
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
        layers: every layer's spectrum; kept for the latest snapshots only, older ones keep their
            ``kinds`` summary.
    """

    step: int
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: list[LayerSpectrum] = field(default_factory=list)


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
        no_grad_layers: LoRA modules whose A and B got no gradient in the first steps.
        b_still_zero_layers: LoRA modules whose B is still exactly zero after the first steps.
        frozen_in_place: LoRA modules whose weights did not change at all in the first steps (only
            judged when some step had a positive learning rate and finite gradients).
        max_steps: the run's planned number of optimizer steps (0 when unknown).
        num_train_epochs: planned epochs.
        train_examples: examples in the training set, when the Trainer knows.
        learning_rate: the configured peak learning rate.
        world_size: number of processes.
        is_rl: True for reinforcement-learning or preference runs (GRPO, DPO, ORPO ...).
        trainer: the trainer class's name.
        device_total_memory: bytes of the accelerator's memory, when there is one.
        resumed_from: the checkpoint folder a resumed run started from.
        checkpoint_adapters: the adapters' configurations as that checkpoint saved them (its
            ``adapter_config.json``), by name.
        vllm_max_lora_rank: the largest LoRA rank the vLLM engine that serves generations accepts
            (its ``max_lora_rank``), when the run generates through vLLM with LoRA.
        memory: what the memory probe read (None when no probe ran, e.g. offline).
        spectrum: snapshots of the learned updates' spectra, oldest first (the spectrum probe).
        spectrum_notes: why the spectrum could not be read for some layers (4-bit base without
            bitsandbytes, FSDP1 flat parameters ...).
        supervised_tokens: tokens of the training set with a label other than -100 (estimated
            from a sample when the set is large); None when unknown (an iterable dataset).
        supervised_tokens_sampled: True when ``supervised_tokens`` is extrapolated from a sample.
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
    b_still_zero_layers: list[str] = field(default_factory=list)
    frozen_in_place: list[str] = field(default_factory=list)
    max_steps: int = 0
    num_train_epochs: float | None = None
    train_examples: int | None = None
    learning_rate: float | None = None
    world_size: int = 1
    is_rl: bool = False
    trainer: str | None = None
    device_total_memory: int | None = None
    # --- multigpu / ecosystem ---
    resumed_from: str | None = None
    checkpoint_adapters: dict[str, AdapterFacts] = field(default_factory=dict)
    vllm_max_lora_rank: int | None = None
    memory: MemoryFacts | None = None
    # --- rank ---
    spectrum: list[SpectrumSnapshot] = field(default_factory=list)
    spectrum_notes: list[str] = field(default_factory=list)
    supervised_tokens: int | None = None
    supervised_tokens_sampled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The facts as JSON-able data (the diagnosis file's ``run`` block builds on it)."""
        return asdict(self)

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
                )
                for snap in values["spectrum"]
                if isinstance(snap, Mapping)
            ]
        return cls(**values)


_T = TypeVar("_T")


def _dataclass_from(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """A dataclass from a dict of its fields: unknown keys ignored, lists of ints made tuples where
    the field holds a shape."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in data.items() if k in known}
    for key in ("a_shape", "b_shape"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return cls(**values)
