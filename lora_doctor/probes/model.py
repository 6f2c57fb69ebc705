"""RunFacts from a live PEFT model: LoRA layers, parameter counts, optimizer coverage, first steps.

The model is read through the run's :class:`~lora_doctor.probes.view.ModelView` (which parameters
are LoRA and their true sizes under DeepSpeed ZeRO-3, FSDP and 4-bit); this module turns it into
facts, and follows the adapters' weights and gradients through the first steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_doctor.facts import AdapterFacts, LayerFacts, RunFacts
from lora_doctor.probes.base import Event, Probe
from lora_doctor.probes.device import drain
from lora_doctor.probes.view import (
    LayerView,
    ModelView,
    ParamView,
    Role,
    optimizer_chain,
    weight_of,
)

__all__ = ["AdapterProbe", "facts_from_view", "peak_learning_rate", "read_facts"]


# --- LoRA layers --------------------------------------------------------------------------------------
def _holder_shape(view: ModelView, holder: Any, name: str) -> tuple[int, ...] | None:
    """True shape of a LoRA A or B weight; from the module's features when the tensor is flat."""
    w = weight_of(holder)
    if w is None:
        return None
    shape = view.true_shape(w, name)
    if len(shape) >= 2:
        return shape
    out_f, in_f = getattr(holder, "out_features", None), getattr(holder, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):  # FSDP flat view of an nn.Linear
        return (out_f, in_f)
    return None


def _base_kind(base: nn.Module) -> tuple[str, bool]:
    """A short kind of the base layer and whether it stores its weight as (in, out) (Conv1D)."""
    cls = type(base).__name__
    if cls == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
        return "conv1d", True
    if isinstance(base, nn.Embedding):
        return "embedding", False
    if isinstance(base, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "conv", False
    return "linear", False


def _features(module: nn.Module, base: nn.Module) -> tuple[int | None, int | None]:
    """(d_in, d_out) of the base layer: peft's own reading first, then the base module's."""
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(d_in, int) and isinstance(d_out, int):
        return d_in, d_out
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    for i_attr, o_attr in (("in_features", "out_features"), ("in_channels", "out_channels")):
        d_in, d_out = getattr(base, i_attr, None), getattr(base, o_attr, None)
        if isinstance(d_in, int) and isinstance(d_out, int):
            return d_in, d_out
    return None, None


def _dict_get(d: Any, key: str, default: Any) -> Any:
    try:
        return d[key] if d is not None and key in d else default
    except TypeError:
        return default


def _layer_facts(
    view: ModelView, layer: LayerView, adapters: dict[str, AdapterFacts]
) -> list[LayerFacts]:
    """One LayerFacts per adapter of a LoRA layer, read from the layer itself."""
    name, module, base = layer.name, layer.module, layer.base
    kind, fan_in_fan_out = _base_kind(base)
    fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", fan_in_fan_out))
    d_in, d_out = _features(module, base)
    base_weight = getattr(base, "weight", None)
    base_numel = (
        view.true_numel(base_weight, f"{name}.base_layer.weight")
        if isinstance(base_weight, torch.Tensor)
        else 0
    )
    active = layer.active
    out: list[LayerFacts] = []
    for adapter in layer.adapters:
        a, b = layer.holders(adapter)
        if a is None:
            continue
        cfg = adapters.get(adapter)
        is_emb = not isinstance(a, nn.Module)
        a_name = (
            f"{name}.lora_{'embedding_' if is_emb else ''}A.{adapter}{'' if is_emb else '.weight'}"
        )
        b_name = (
            a_name.replace("A.", "B.", 1) if not is_emb else f"{name}.lora_embedding_B.{adapter}"
        )
        magnitude = _dict_get(getattr(module, "lora_magnitude_vector", None), adapter, None)
        use_dora = bool(
            _dict_get(getattr(module, "use_dora", None), adapter, False)
            or magnitude is not None
            or (cfg is not None and cfg.use_dora)
        )
        out.append(
            LayerFacts(
                name=name,
                adapter=adapter,
                kind=kind,
                r=int(_dict_get(module.r, adapter, 0)),
                lora_alpha=float(_dict_get(module.lora_alpha, adapter, 0.0)),
                scaling=float(_dict_get(module.scaling, adapter, 0.0)),
                use_rslora=bool(
                    _dict_get(getattr(module, "use_rslora", None), adapter, False)
                    or (cfg is not None and cfg.use_rslora)
                ),
                use_dora=use_dora,
                d_in=d_in,
                d_out=d_out,
                a_shape=_holder_shape(view, a, a_name),
                b_shape=_holder_shape(view, b, b_name),
                base_type=type(base).__name__,
                fan_in_fan_out=fan_in_fan_out,
                base_numel=base_numel,
                active=active is None or adapter in active,
                zero_norm_rows=_zero_norm_rows(magnitude, d_out) if use_dora else None,
            )
        )
    return out


def _zero_norm_rows(magnitude: Any, rows: int | None) -> int | None:
    """Entries of a DoRA magnitude vector that are exactly 0. peft initialises it to the row norms
    of ``W + scaling * B @ A`` (``DoraLinearLayer.update_layer``), and DoRA's forward divides it by
    those norms: a zero entry is a row where it divides 0 by 0. None when the vector is not whole
    here (a ZeRO-3 partition, a DTensor shard, an FSDP view: anything but ``rows`` plain values)."""
    w = weight_of(magnitude)
    if w is None or type(w) not in (torch.Tensor, nn.Parameter) or hasattr(w, "ds_id"):
        return None
    if rows is None or w.numel() != rows:
        return None
    with torch.no_grad():
        return int((w.detach() == 0).sum())


# --- facts ------------------------------------------------------------------------------------------
def read_facts(model: Any, facts: RunFacts, optimizer: Any = None) -> list[tuple[str, nn.Module]]:
    """Fills ``facts`` from a live (possibly wrapped) PEFT model; returns its LoRA layers as
    (clean name, module). :func:`facts_from_view` on a view built now.

    Example:
        >>> facts = RunFacts()
        >>> layers = read_facts(peft_model, facts)  # doctest: +SKIP
        >>> facts.has_lora, facts.lora_params  # doctest: +SKIP
        (True, 16384)
    """
    return [
        (layer.name, layer.module)
        for layer in facts_from_view(ModelView.build(model, optimizer), facts)
    ]


def facts_from_view(view: ModelView, facts: RunFacts) -> list[LayerView]:
    """Fills ``facts`` from the model's view: adapter configs, LoRA layers, parameter counts,
    trainable base weights and LoRA parameters missing from the optimizer. Leaves ``facts`` as they
    are when the view has no model. Returns the LoRA layers."""
    if not view.is_module:
        return []
    for adapter, data in view.configs.items():
        facts.adapters[adapter] = AdapterFacts.from_config(adapter, data)
    facts.has_lora = bool(view.layers)
    facts.layers = [lf for layer in view.layers for lf in _layer_facts(view, layer, facts.adapters)]
    _count_params(view, facts)
    return view.layers


def _count_params(view: ModelView, facts: RunFacts) -> None:
    """Parameter counts, trainable base weights and LoRA parameters missing from the optimizer."""
    biases_trained = any(a.bias in ("all", "lora_only") for a in facts.adapters.values())
    facts.lora_params = facts.base_params = facts.trainable_params = 0
    facts.trainable_lora_params = facts.trainable_base_params = 0
    facts.lora_params_by_adapter, facts.trainable_base, facts.not_in_optimizer = {}, [], []
    lora_trainable: list[ParamView] = []
    for prm in view.params:
        if prm.trainable:
            facts.trainable_params += prm.numel
        if prm.role.is_lora:
            facts.lora_params += prm.numel
            key = prm.adapter or "default"
            facts.lora_params_by_adapter[key] = facts.lora_params_by_adapter.get(key, 0) + prm.numel
            if prm.trainable:
                facts.trainable_lora_params += prm.numel
                lora_trainable.append(prm)
        elif prm.role is Role.BASE:
            facts.base_params += prm.numel
            if prm.trainable and not (biases_trained and prm.name.endswith(".bias")):
                facts.trainable_base.append(prm.name)
                facts.trainable_base_params += prm.numel
    facts.not_in_optimizer = [p.name for p in lora_trainable if view.in_optimizer(p) is False]


def _data(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local data of ``t`` (a DTensor's shard); None when there is none here (empty ZeRO-3 or
    FSDP shard). A ZeRO-3 parameter's full value comes through DeepSpeed's
    ``safe_get_full_fp32_param`` when deepspeed is importable."""
    if t is None:
        return None
    if (ds := _zero3_utils(t)) is not None:
        return ds.safe_get_full_fp32_param(t)
    to_local = getattr(t, "to_local", None)
    local = to_local() if callable(to_local) else t
    return local.detach() if local.numel() > 0 else None


def _zero3_utils(t: torch.Tensor) -> Any:
    """``deepspeed.utils`` when ``t`` is a ZeRO-3 partitioned parameter (an empty local tensor
    with ``ds_shape``) and deepspeed is importable, else None. Its accessors gather the full
    tensor: a collective, which every rank reaches alike (all ranks hold the same LoRA layers and
    call the probe's hooks at the same steps)."""
    if getattr(t, "ds_shape", None) is None or t.numel() != 0:
        return None
    try:
        from deepspeed import utils as ds_utils
    except Exception:
        return None
    return ds_utils


def _grads_elsewhere(optimizer: Any, tensors: list[torch.Tensor]) -> bool:
    """True when gradients may live outside ``.grad``: DeepSpeed ZeRO parameters (``ds_id``) or a
    DeepSpeed optimizer anywhere in the wrapper chain (ZeRO-1/2 keep reduced gradients in their own
    partitions)."""
    if any(hasattr(t, "ds_id") or hasattr(t, "ds_shape") for t in tensors):
        return True
    return any(
        type(opt).__module__.startswith("deepspeed") or "DeepSpeed" in type(opt).__name__
        for opt in optimizer_chain(optimizer)
    )


def _grad(t: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``t``: ``.grad``, or a ZeRO-3 parameter's through ``safe_get_full_grad``."""
    ds = _zero3_utils(t) if t.grad is None else None
    return ds.safe_get_full_grad(t) if ds is not None else t.grad


def peak_learning_rate(optimizer: Any) -> float | None:
    """The largest learning rate of the optimizer's param groups (now); None when unknown."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    try:
        return max(float(g.get("lr", 0.0)) for g in groups)
    except (TypeError, ValueError):
        return None


def _fingerprints(
    tensors: list[torch.Tensor | None],
) -> list[tuple[float, float] | None]:
    """(sum, sum of squares) of each tensor in float64, with one device sync; None stays None.

    A change of any element changes them (float64 sums of float32 or bf16 values are exact enough
    that an update leaving both unchanged is practically impossible), and they cost two numbers
    per tensor instead of a copy of the weights. Two reductions a tensor, each upcasting as it
    reads (``sum(dtype=)``, ``vector_norm(dtype=)``: no float64 copy), and one stack: 449 kernel
    launches for the 224 LoRA tensors of a 16-layer model on all linear layers, where a copy, a
    square and a stack per tensor took three times as many (12 ms a call on an H200's host).
    The sum of squares is the squared norm: exactly 0 for an all-zero tensor.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    device = present[0].device
    parts: list[torch.Tensor] = []
    for t in present:
        pair = (t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64))
        parts += pair if t.device == device else (x.to(device) for x in pair)
    values = iter(torch.stack(parts).tolist())
    return [None if t is None else (next(values), next(values) ** 2) for t in tensors]


def _peaks(tensors: list[torch.Tensor]) -> list[float]:
    """max |t| of each tensor with one fused reduction and one device sync."""
    if not tensors:
        return []
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, float("inf"))
    return torch.stack([n.float().to(device) for n in norms]).tolist()


@dataclass
class _Watched:
    """The LoRA weights of one (layer, adapter) that the first-steps checks follow."""

    key: str
    a: torch.Tensor | None
    b: torch.Tensor | None
    a0: tuple[float, float] | None = None
    b0: tuple[float, float] | None = None
    got_grad: bool = False
    grad_known: bool = False
    #: Every step so far gave each of its tensors a gradient (zero or not), outside DeepSpeed.
    grad_always_there: bool = True

    @property
    def trainable(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.a, self.b))


class AdapterProbe(Probe):
    """Reads the LoRA adapter from the live model and follows it through the first steps.

    At ``train_begin`` it fills the run facts (layers, configs, counts, optimizer coverage) and takes
    a fingerprint of the active adapters' A and B: their sum and sum of squares in float64, two
    numbers per tensor, so no copy of the weights is held on the device. During the first
    ``config.check_after_steps`` optimizer steps it records, with one fused reduction and one device
    sync per step (its wait for the training's queued work left out of the doctor's time budget,
    :func:`~lora_doctor.probes.device.drain`), which layers got a non-zero gradient; at step
    ``check_after_steps`` it compares A and B with their fingerprint (judging "moved" against the
    start, not against zero, so that pissa/olora inits are no false alarm; an update that leaves
    both float64 sums unchanged is practically impossible) and fills ``no_grad_layers``,
    ``b_still_zero_layers`` and ``frozen_in_place``. A layer without a non-zero gradient whose
    gradients were there at every step, all zeros (not None), goes to ``zero_grad_layers`` too: the
    graph reaches it and the loss had no signal, as on an online RL step whose completions all got
    the same reward.
    Movement is judged only when some step had a positive learning rate and finite gradients
    (warm-up from 0 and fp16 overflow-skipped steps leave weights in place legitimately).
    """

    name = "adapter"

    def __init__(self) -> None:
        self._watched: list[_Watched] = []
        self._grad_steps = 0
        self._moving_steps = 0
        self._done = False

    def train_begin(self, event: Event) -> None:
        layers = facts_from_view(event.model_view(), event.doctor.facts)
        self._watched = []
        if event.step >= event.doctor.config.check_after_steps:  # resumed past the first steps
            self._done = True
            return
        for layer in layers:
            for adapter in layer.adapters:
                if layer.active is not None and adapter not in layer.active:
                    continue
                a, b = (t if _data(t) is not None else None for t in layer.weights(adapter))
                if a is None and b is None:  # empty ZeRO-3/FSDP shards: nothing to follow here
                    continue
                several = len(layer.adapters) > 1
                key = f"{layer.name} ({adapter})" if several else layer.name
                self._watched.append(_Watched(key, a, b))
        data = [d for w in self._watched for d in (_data(w.a), _data(w.b))]
        drain(event.budget, data, event.step)
        with torch.no_grad():
            starts = _fingerprints(data)
        for i, w in enumerate(self._watched):
            w.a0, w.b0 = starts[2 * i], starts[2 * i + 1]

    def pre_optimizer_step(self, event: Event) -> None:
        if not self._watched or self._grad_steps >= event.doctor.config.check_after_steps:
            return
        self._grad_steps += 1
        tensors = [(w, t) for w in self._watched for t in (w.a, w.b) if t is not None]
        read = [(w, _data(_grad(t))) for w, t in tensors]
        grads = [(w, g) for w, g in read if g is not None]
        elsewhere = _grads_elsewhere(event.optimizer, [t for _, t in tensors])
        if not grads and elsewhere:
            return  # DeepSpeed keeps gradients in its own buffers: unknown, not "none"
        # Without DeepSpeed, a None .grad just before the optimizer step means no gradient reached
        # the parameter (e.g. gradient checkpointing on a frozen base without input gradients),
        # while a gradient of zeros means it reached it without signal (an RL step with no reward
        # variance). DeepSpeed's buffers read zero where nothing arrived: no telling there.
        drain(event.budget, [g for _, g in grads], event.step)
        with torch.no_grad():
            peaks = _peaks([g for _, g in grads])
        for w, g in read:
            w.grad_known = True
            if elsewhere or g is None:
                w.grad_always_there = False
        for (w, _), peak in zip(grads, peaks, strict=True):
            if peak != 0:
                w.got_grad = True
        lr = peak_learning_rate(event.optimizer)
        if all(math.isfinite(p) for p in peaks) and (lr is None or lr > 0):
            self._moving_steps += 1

    def step_end(self, event: Event) -> None:
        if self._done or event.step < event.doctor.config.check_after_steps:
            return
        self._done = True
        facts = event.doctor.facts
        data = [d for w in self._watched for d in (_data(w.a), _data(w.b))]
        drain(event.budget, data, event.step)
        with torch.no_grad():
            now = _fingerprints(data)
        moved: dict[int, bool] = {}
        b_zero: set[int] = set()
        for i, w in enumerate(self._watched):
            a_now, b_now = now[2 * i], now[2 * i + 1]
            if b_now is not None and b_now[1] == 0:  # sum of squares 0: B is exactly zero
                b_zero.add(id(w))
            pairs = [(x, y) for x, y in ((a_now, w.a0), (b_now, w.b0)) if x is not None and y]
            if pairs:
                moved[id(w)] = any(x != y for x, y in pairs)
        judge_movement = self._moving_steps > 0
        for w in self._watched:
            if not w.trainable or (w.grad_known and not w.got_grad):
                facts.no_grad_layers.append(w.key)
                if w.trainable and w.grad_known and w.grad_always_there:
                    facts.zero_grad_layers.append(w.key)
            if judge_movement and id(w) in b_zero:
                facts.b_still_zero_layers.append(w.key)
            if judge_movement and moved.get(id(w)) is False:
                facts.frozen_in_place.append(w.key)
