"""RunFacts from a live PEFT model: LoRA layers, parameter counts, optimizer coverage, first steps.

Safe under DeepSpeed ZeRO-3 (parameters carry ``ds_shape``/``ds_numel``, the local tensor is empty),
FSDP (flat parameters: true shapes from the ``FlatParameter``'s records or the modules' features;
``DTensor`` shapes are global) and 4-bit bases (``Params4bit`` packs two values per byte).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_doctor.facts import AdapterFacts, LayerFacts, RunFacts
from lora_doctor.probes.base import Event, Probe

__all__ = ["AdapterProbe", "find_lora_layers", "read_facts", "unwrap_model"]

_LORA_TYPES: tuple[type, ...] = ()
try:  # peft is optional at import time: duck typing covers its absence and patched layers
    from peft.tuners.lora import LoraLayer

    _LORA_TYPES = (LoraLayer,)
except Exception:  # pragma: no cover - peft is installed with the [hf] extra
    pass

#: Wrapper prefixes that distributed/compile wrappers add to parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: The prefix peft puts before the base model's own module names.
_PEFT_PREFIX = "base_model.model."
#: Names of peft's trainable-but-not-base parameters besides LoRA's own.
_AUX_MARKERS = (".modules_to_save.", "trainable_tokens_delta")


def unwrap_model(model: Any) -> Any:
    """The model under DDP, FSDP, DeepSpeed and ``torch.compile`` wrappers.

    Example:
        >>> class Wrapper(nn.Module):
        ...     def __init__(self, module):
        ...         super().__init__()
        ...         self.module = module
        >>> inner = nn.Linear(2, 2)
        >>> unwrap_model(Wrapper(Wrapper(inner))) is inner
        True
    """
    seen = 0
    while model is not None and seen < 8 and not hasattr(model, "peft_config"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def _clean(name: str) -> str:
    """A parameter or module name without wrapper parts and peft's ``base_model.model.`` prefix."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name


def _is_lora_layer(module: nn.Module) -> bool:
    """peft's ``LoraLayer``, or a layer that looks like one (Unsloth and other patched layers)."""
    if isinstance(module, _LORA_TYPES):
        return True
    return all(
        isinstance(getattr(module, attr, None), dict | nn.ModuleDict | nn.ParameterDict)
        for attr in ("r", "lora_alpha", "scaling")
    ) and (hasattr(module, "lora_A") and hasattr(module, "lora_B"))


def find_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LoRA-wrapped modules of ``model`` as (clean name, module).

    Example:
        >>> [name for name, _ in find_lora_layers(peft_model)]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj', ...]
    """
    return [(_clean(n), m) for n, m in model.named_modules() if _is_lora_layer(m)]


# --- true sizes -------------------------------------------------------------------------------------
def _flat_records(model: nn.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """FSDP (v1) flat parameters' records: clean original name -> (true shape, true numel)."""
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        fqns, shapes = getattr(p, "_fqns", None), getattr(p, "_shapes", None)
        if fqns is None or shapes is None:
            continue
        prefix = name.rsplit("_flat_param", 1)[0]
        for fqn, shape in zip(fqns, shapes, strict=False):
            dims = tuple(int(d) for d in shape)
            out[_clean(prefix + fqn)] = (dims, math.prod(dims))
    return out


def _true_shape(
    p: torch.Tensor, records: dict[str, tuple[tuple[int, ...], int]], name: str
) -> tuple[int, ...]:
    """The logical shape of ``p``: ZeRO-3's ``ds_shape``, FSDP's records, 4-bit's quant state,
    else the tensor's own (a ``DTensor``'s shape is global)."""
    ds = getattr(p, "ds_shape", None)
    if ds is not None:
        return tuple(int(d) for d in ds)
    if name in records:
        return records[name][0]
    qs_shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if qs_shape is not None:
        return tuple(int(d) for d in qs_shape)
    return tuple(int(d) for d in p.shape)


def _true_numel(p: torch.Tensor, records: dict[str, tuple[tuple[int, ...], int]], name: str) -> int:
    """The logical element count of ``p`` (see :func:`_true_shape`); packed 4-bit counts twice."""
    ds = getattr(p, "ds_numel", None)
    if ds is not None:
        return int(ds)
    if name in records:
        return records[name][1]
    if type(p).__name__ == "Params4bit":
        qs_shape = getattr(getattr(p, "quant_state", None), "shape", None)
        if qs_shape is not None:
            return math.prod(int(d) for d in qs_shape)
        return p.numel() * 2 if p.dtype == torch.uint8 else p.numel()
    return p.numel()


@dataclass
class _Param:
    name: str
    numel: int
    trainable: bool
    tensor: torch.Tensor


def _params(model: nn.Module, records: dict[str, tuple[tuple[int, ...], int]]) -> Iterator[_Param]:
    """Every parameter once, by clean name, at its true size; FSDP flat parameters expanded."""
    for name, p in model.named_parameters():
        fqns, numels = getattr(p, "_fqns", None), getattr(p, "_numels", None)
        if fqns is not None and numels is not None:  # FSDP flat parameter (use_orig_params=False)
            prefix = name.rsplit("_flat_param", 1)[0]
            for fqn, n in zip(fqns, numels, strict=False):
                yield _Param(_clean(prefix + fqn), int(n), bool(p.requires_grad), p)
            continue
        clean = _clean(name)
        yield _Param(clean, _true_numel(p, records, clean), bool(p.requires_grad), p)


# --- LoRA layers --------------------------------------------------------------------------------------
def _lora_pair(module: nn.Module, adapter: str) -> tuple[Any, Any]:
    """The (A, B) holders of ``adapter`` in a LoRA layer: Linear/Conv modules or bare Parameters."""
    for a_attr, b_attr in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        a_dict, b_dict = getattr(module, a_attr, None), getattr(module, b_attr, None)
        if a_dict is not None and b_dict is not None and adapter in a_dict and adapter in b_dict:
            return a_dict[adapter], b_dict[adapter]
    return None, None


def _weight(holder: Any) -> torch.Tensor | None:
    if isinstance(holder, torch.Tensor):
        return holder
    w = getattr(holder, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _holder_shape(
    holder: Any, records: dict[str, tuple[tuple[int, ...], int]], name: str
) -> tuple[int, ...] | None:
    """True shape of a LoRA A or B weight; from the module's features when the tensor is flat."""
    w = _weight(holder)
    if w is None:
        return None
    shape = _true_shape(w, records, name)
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


def _base_layer(module: nn.Module) -> nn.Module:
    get = getattr(module, "get_base_layer", None)
    if callable(get):
        return get()
    return getattr(module, "base_layer", module)


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
    name: str,
    module: nn.Module,
    adapters: dict[str, AdapterFacts],
    records: dict[str, tuple[tuple[int, ...], int]],
) -> list[LayerFacts]:
    """One LayerFacts per adapter of a LoRA layer, read from the layer itself."""
    base = _base_layer(module)
    kind, fan_in_fan_out = _base_kind(base)
    fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", fan_in_fan_out))
    d_in, d_out = _features(module, base)
    base_weight = getattr(base, "weight", None)
    base_numel = (
        _true_numel(base_weight, records, f"{name}.base_layer.weight")
        if isinstance(base_weight, torch.Tensor)
        else 0
    )
    active = _active_adapters(module)
    out: list[LayerFacts] = []
    for adapter in list(getattr(module, "r", {}) or {}):
        a, b = _lora_pair(module, adapter)
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
                a_shape=_holder_shape(a, records, a_name),
                b_shape=_holder_shape(b, records, b_name),
                base_type=type(base).__name__,
                fan_in_fan_out=fan_in_fan_out,
                base_numel=base_numel,
                active=active is None or adapter in active,
            )
        )
    return out


# --- optimizer ----------------------------------------------------------------------------------------
def _optimizer_param_ids(optimizer: Any) -> set[int]:
    """Ids of the model parameters an optimizer updates, through accelerate/DeepSpeed wrappers."""
    ids: set[int] = set()
    seen = 0
    while optimizer is not None and seen < 4:
        for group in getattr(optimizer, "param_groups", None) or ():
            ids.update(id(p) for p in group.get("params", ()))
        for attr in ("bit16_groups", "fp16_groups"):  # DeepSpeed ZeRO keeps the model's params here
            for group in getattr(optimizer, attr, None) or ():
                ids.update(id(p) for p in group)
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return ids


# --- the probe ----------------------------------------------------------------------------------------
#: Names of the module dicts that hold LoRA's own parameters, keyed by adapter name.
_LORA_HOLDERS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)


def _lora_adapter_of(name: str) -> str | None:
    """The adapter a LoRA parameter belongs to, from its name (``...lora_A.<adapter>.weight``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _LORA_HOLDERS:
            return parts[i + 1]
    return None


def _active_adapters(module: nn.Module) -> set[str] | None:
    """The adapters selected to train in a LoRA layer (even while disabled, which is then a
    finding); None when the layer does not say."""
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", None)
    if isinstance(active, str):
        return {active}
    return {str(a) for a in active} if isinstance(active, list | tuple | set) else None


def read_facts(model: Any, facts: RunFacts, optimizer: Any = None) -> list[tuple[str, nn.Module]]:
    """Fills ``facts`` from a live (possibly wrapped) PEFT model; returns its LoRA layers.

    Example:
        >>> facts = RunFacts()
        >>> layers = read_facts(peft_model, facts)  # doctest: +SKIP
        >>> facts.has_lora, facts.lora_params  # doctest: +SKIP
        (True, 16384)
    """
    model = unwrap_model(model)
    if not isinstance(model, nn.Module):
        return []
    configs = getattr(model, "peft_config", None) or {}
    for adapter, cfg in dict(configs).items():
        to_dict = getattr(cfg, "to_dict", None)
        data = to_dict() if callable(to_dict) else dict(vars(cfg))
        facts.adapters[str(adapter)] = AdapterFacts.from_config(str(adapter), data)
    records = _flat_records(model)
    layers = find_lora_layers(model)
    facts.has_lora = bool(layers)
    facts.layers = [
        lf for name, m in layers for lf in _layer_facts(name, m, facts.adapters, records)
    ]
    _count_params(model, layers, facts, records, optimizer)
    return layers


def _count_params(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    facts: RunFacts,
    records: dict[str, tuple[tuple[int, ...], int]],
    optimizer: Any,
) -> None:
    """Parameter counts, trainable base weights and LoRA parameters missing from the optimizer."""
    lora_ids = {
        id(p)
        for _, m in layers
        for attr in _LORA_HOLDERS
        if isinstance(getattr(m, attr, None), nn.Module)
        for p in getattr(m, attr).parameters()
    }
    biases_trained = any(a.bias in ("all", "lora_only") for a in facts.adapters.values())
    facts.lora_params = facts.base_params = facts.trainable_params = 0
    facts.trainable_lora_params = facts.trainable_base_params = 0
    facts.lora_params_by_adapter, facts.trainable_base, facts.not_in_optimizer = {}, [], []
    lora_trainable: list[_Param] = []
    model_ids: set[int] = set()
    for prm in _params(model, records):
        model_ids.add(id(prm.tensor))
        adapter = _lora_adapter_of(prm.name)
        if prm.trainable:
            facts.trainable_params += prm.numel
        if adapter is not None or id(prm.tensor) in lora_ids:
            facts.lora_params += prm.numel
            key = adapter or "default"
            facts.lora_params_by_adapter[key] = facts.lora_params_by_adapter.get(key, 0) + prm.numel
            if prm.trainable:
                facts.trainable_lora_params += prm.numel
                lora_trainable.append(prm)
        elif not any(marker in prm.name for marker in _AUX_MARKERS):
            facts.base_params += prm.numel
            if prm.trainable and not (biases_trained and prm.name.endswith(".bias")):
                facts.trainable_base.append(prm.name)
                facts.trainable_base_params += prm.numel
    # Judge optimizer coverage only when the optimizer visibly holds some of this model's params
    # (DeepSpeed or FSDP flat buffers we cannot see through make it unknown, not a finding).
    in_optimizer = _optimizer_param_ids(optimizer) if optimizer is not None else set()
    if in_optimizer & model_ids:
        facts.not_in_optimizer = [
            p.name for p in lora_trainable if id(p.tensor) not in in_optimizer
        ]


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
    seen = 0
    while optimizer is not None and seen < 4:
        cls = type(optimizer)
        if cls.__module__.startswith("deepspeed") or "DeepSpeed" in cls.__name__:
            return True
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return False


def _grad(t: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``t``: ``.grad``, or a ZeRO-3 parameter's through ``safe_get_full_grad``."""
    ds = _zero3_utils(t) if t.grad is None else None
    return ds.safe_get_full_grad(t) if ds is not None else t.grad


def _lr(optimizer: Any) -> float | None:
    """The largest learning rate of the optimizer's param groups; None when unknown."""
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
    per tensor instead of a copy of the weights.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    device = present[0].device
    sums = torch.stack(
        [
            torch.stack((t.sum(dtype=torch.float64), t.double().square().sum())).to(device)
            for t in present
        ]
    ).tolist()
    values = iter(sums)
    return [None if t is None else tuple(next(values)) for t in tensors]  # type: ignore[misc]


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

    @property
    def trainable(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.a, self.b))


class AdapterProbe(Probe):
    """Reads the LoRA adapter from the live model and follows it through the first steps.

    At ``train_begin`` it fills the run facts (layers, configs, counts, optimizer coverage) and takes
    a fingerprint of the active adapters' A and B: their sum and sum of squares in float64, two
    numbers per tensor, so no copy of the weights is held on the device. During the first
    ``config.check_after_steps`` optimizer steps it records, with one fused reduction and one device
    sync per step, which layers got a non-zero gradient; at step ``check_after_steps`` it compares A
    and B with their fingerprint (judging "moved" against the start, not against zero, so that
    pissa/olora inits are no false alarm; an update that leaves both float64 sums unchanged is
    practically impossible) and fills ``no_grad_layers``, ``b_still_zero_layers`` and
    ``frozen_in_place``.
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
        layers = read_facts(event.model, event.doctor.facts, event.optimizer)
        self._watched = []
        if event.step >= event.doctor.config.check_after_steps:  # resumed past the first steps
            self._done = True
            return
        for name, module in layers:
            active = _active_adapters(module)
            adapters = list(getattr(module, "r", {}) or {})
            for adapter in adapters:
                if active is not None and adapter not in active:
                    continue
                a, b = (_weight(h) for h in _lora_pair(module, adapter))
                a, b = (t if _data(t) is not None else None for t in (a, b))
                if a is None and b is None:  # empty ZeRO-3/FSDP shards: nothing to follow here
                    continue
                key = f"{name} ({adapter})" if len(adapters) > 1 else name
                self._watched.append(_Watched(key, a, b))
        with torch.no_grad():
            starts = _fingerprints([d for w in self._watched for d in (_data(w.a), _data(w.b))])
        for i, w in enumerate(self._watched):
            w.a0, w.b0 = starts[2 * i], starts[2 * i + 1]

    def pre_optimizer_step(self, event: Event) -> None:
        if not self._watched or self._grad_steps >= event.doctor.config.check_after_steps:
            return
        self._grad_steps += 1
        tensors = [(w, t) for w in self._watched for t in (w.a, w.b) if t is not None]
        grads = [(w, g) for w, t in tensors if (g := _data(_grad(t))) is not None]
        if not grads and _grads_elsewhere(event.optimizer, [t for _, t in tensors]):
            return  # DeepSpeed keeps gradients in its own buffers: unknown, not "none"
        # Without DeepSpeed, a None .grad just before the optimizer step means no gradient reached
        # the parameter (e.g. gradient checkpointing on a frozen base without input gradients).
        with torch.no_grad():
            peaks = _peaks([g for _, g in grads])
        for w, _ in tensors:
            w.grad_known = True
        for (w, _), peak in zip(grads, peaks, strict=True):
            if peak != 0:
                w.got_grad = True
        lr = _lr(event.optimizer)
        if all(math.isfinite(p) for p in peaks) and (lr is None or lr > 0):
            self._moving_steps += 1

    def step_end(self, event: Event) -> None:
        if self._done or event.step < event.doctor.config.check_after_steps:
            return
        self._done = True
        facts = event.doctor.facts
        with torch.no_grad():
            now = _fingerprints([d for w in self._watched for d in (_data(w.a), _data(w.b))])
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
            if judge_movement and id(w) in b_zero:
                facts.b_still_zero_layers.append(w.key)
            if judge_movement and moved.get(id(w)) is False:
                facts.frozen_in_place.append(w.key)
