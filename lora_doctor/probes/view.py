"""One view of the live model for the probes: which parameters are LoRA, at what true size.

:class:`ModelView` is built at train begin from the model and the optimizer, with ONE walk of the
module tree, and shared by the probes through the event (:meth:`~lora_doctor.probes.base.Event.
model_view`): the adapter probe reads the facts from it, the memory probe the bytes by storage type,
the spectrum probe the LoRA factors. It holds

- the model under DDP, FSDP, DeepSpeed and ``torch.compile`` wrappers, and its peft configs;
- the LoRA layers, each with its adapters, their A and B, and its base layer;
- every parameter once, by clean name, with its true element count and its role (LoRA A, B,
  embedding A/B or DoRA magnitude of an adapter, a ``modules_to_save`` copy, or base), and whether
  the optimizer updates it.

True sizes: DeepSpeed ZeRO-3 leaves an empty local tensor with ``ds_shape``/``ds_numel``; FSDP1 flat
parameters (``use_orig_params=False``) carry their originals' names, shapes and counts
(``_fqns``/``_shapes``/``_numels``), and are expanded into them; FSDP2 ``DTensor`` shapes are
global; a 4-bit ``Params4bit`` packs two values per byte, its quant state has the true shape.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerView",
    "ModelView",
    "ParamView",
    "Role",
    "storage",
    "unwrap_model",
    "unwrap_optimizer",
]

_LORA_TYPES: tuple[type, ...] = ()
try:  # peft is optional at import time: duck typing covers its absence and patched layers
    from peft.tuners.lora import LoraLayer as _PeftLoraLayer

    _LORA_TYPES = (_PeftLoraLayer,)
except Exception:  # pragma: no cover - peft is installed with the [hf] extra
    pass

#: Wrapper prefixes that distributed/compile wrappers add to parameter names (FSDP1, activation
#: checkpointing, torch.compile, Lightning Fabric).
_WRAPPER_PARTS = (
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
    "_orig_mod.",
    "_forward_module.",
)
#: The prefix peft puts before the base model's own module names.
_PEFT_PREFIX = "base_model.model."
#: Names of peft's trainable-but-not-base parameters besides LoRA's own.
_AUX_MARKERS = (".modules_to_save.", "trainable_tokens_delta")
#: How far wrappers are followed (a loop guard: real stacks are 1 to 3 deep).
_MAX_WRAPPERS = 8

Records = dict[str, tuple[tuple[int, ...], int]]


class Role(enum.Enum):
    """What a parameter is to the adapter; the LoRA roles are named after peft's module dicts."""

    LORA_A = "lora_A"
    LORA_B = "lora_B"
    LORA_EMBEDDING_A = "lora_embedding_A"
    LORA_EMBEDDING_B = "lora_embedding_B"
    LORA_MAGNITUDE = "lora_magnitude_vector"
    #: peft's trainable copies of whole modules (``modules_to_save``) and trainable token deltas.
    MODULES_TO_SAVE = "modules_to_save"
    BASE = "base"

    @property
    def is_lora(self) -> bool:
        return self not in (Role.MODULES_TO_SAVE, Role.BASE)


_LORA_HOLDERS = {role.value: role for role in Role if role.is_lora}


@dataclass(frozen=True)
class ParamView:
    """One parameter of the model, at its true size.

    Attributes:
        name: its name without wrapper parts and peft's ``base_model.model.`` prefix.
        tensor: the parameter; for an FSDP1 flat parameter's original, the flat parameter (shared
            by all its originals).
        numel: its true element count (see the module docstring).
        trainable: ``requires_grad``.
        role: what it is to the adapter.
        adapter: the adapter a LoRA parameter belongs to, None for the others.
    """

    name: str
    tensor: torch.Tensor
    numel: int
    trainable: bool
    role: Role
    adapter: str | None


@dataclass(frozen=True)
class LayerView:
    """A LoRA-wrapped module (peft's ``LoraLayer``, or a patched layer that looks like one).

    Attributes:
        name: its clean name (``model.layers.0.self_attn.q_proj``).
        module: the LoRA layer.
        base: the layer it wraps (``get_base_layer()``).
        adapters: its adapters, in the order of its ``r`` dict.
        active: the adapters selected to train (even while disabled, which is then a finding);
            None when the layer does not say.
    """

    name: str
    module: nn.Module
    base: nn.Module
    adapters: tuple[str, ...]
    active: frozenset[str] | None

    def holders(self, adapter: str) -> tuple[Any, Any]:
        """The (A, B) holders of ``adapter``: Linear/Conv modules, or bare Parameters for
        embeddings; (None, None) when the layer has no such adapter."""
        for a_attr, b_attr in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            a_dict = getattr(self.module, a_attr, None)
            b_dict = getattr(self.module, b_attr, None)
            if (
                a_dict is not None
                and b_dict is not None
                and adapter in a_dict
                and adapter in b_dict
            ):
                return a_dict[adapter], b_dict[adapter]
        return None, None

    def weights(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The A and B weight tensors of ``adapter`` (None where there is none)."""
        a, b = self.holders(adapter)
        return weight_of(a), weight_of(b)


@dataclass
class ModelView:
    """The model as the probes read it, built once by :meth:`build`.

    Attributes:
        model: the model under its wrappers (not an ``nn.Module`` when none was given).
        configs: each adapter's peft config as a dict, by adapter name.
        layers: the LoRA layers, in module order (the same on every rank).
        params: every parameter once, in module order; FSDP1 flat parameters expanded.
        optimizer_ids: ids of the parameters the optimizer updates; None when that cannot be seen
            (no optimizer, or one that visibly holds none of this model's parameters: DeepSpeed or
            FSDP flat buffers we cannot see through).
        records: FSDP1 flat parameters' originals: clean name -> (true shape, true numel).
        module_kinds: the names peft's ``target_modules`` uses for the model's linear (and Conv1D)
            layers, the last part of each module's name, in model order (``q_proj`` ...; GPT-2:
            ``c_attn``, ``c_proj``, ``c_fc``); LoRA's own and the output head left out.
        gradient_checkpointing: whether a module has gradient checkpointing on (transformers'
            ``is_gradient_checkpointing``, read in the same walk); None when no module has the
            flag (not a transformers model).

    Example:
        >>> view = ModelView.build(peft_model, optimizer)  # doctest: +SKIP
        >>> sum(p.numel for p in view.params if p.role.is_lora)  # doctest: +SKIP
        16384
    """

    model: Any
    configs: dict[str, dict[str, Any]]
    layers: list[LayerView]
    params: list[ParamView]
    optimizer_ids: frozenset[int] | None
    records: Records
    module_kinds: list[str] = field(default_factory=list)
    gradient_checkpointing: bool | None = None

    @classmethod
    def build(cls, model: Any, optimizer: Any = None) -> ModelView:
        """Reads ``model`` (possibly wrapped) and ``optimizer`` with one walk of the module tree."""
        model = unwrap_model(model)
        if not isinstance(model, nn.Module):
            return cls(model, {}, [], [], None, {})
        layers, named, records, kinds, checkpointing = _walk(model)
        lora_parts = _lora_parts(layers)
        params = [v for name, p in named for v in _param_views(name, p, records, lora_parts)]
        in_optimizer = _optimizer_param_ids(optimizer)
        visible = any(id(p) in in_optimizer for _, p in named)
        return cls(
            model=model,
            configs=_configs(model),
            layers=layers,
            params=params,
            optimizer_ids=frozenset(in_optimizer) if visible else None,
            records=records,
            module_kinds=kinds,
            gradient_checkpointing=checkpointing,
        )

    @property
    def is_module(self) -> bool:
        """False when there was no model to read (the view is then empty)."""
        return isinstance(self.model, nn.Module)

    def true_shape(self, tensor: torch.Tensor, name: str) -> tuple[int, ...]:
        """The logical shape of ``tensor`` named ``name`` (clean): ZeRO-3's ``ds_shape``, FSDP1's
        records, 4-bit's quant state, else its own (a ``DTensor``'s shape is global)."""
        ds = getattr(tensor, "ds_shape", None)
        if ds is not None:
            return tuple(int(d) for d in ds)
        if name in self.records:
            return self.records[name][0]
        qs_shape = getattr(getattr(tensor, "quant_state", None), "shape", None)
        if qs_shape is not None:
            return tuple(int(d) for d in qs_shape)
        return tuple(int(d) for d in tensor.shape)

    def true_numel(self, tensor: torch.Tensor, name: str) -> int:
        """The logical element count of ``tensor`` named ``name`` (clean)."""
        return _true_numel(tensor, self.records, name)

    def in_optimizer(self, param: ParamView) -> bool | None:
        """Whether the optimizer updates ``param``; None when that cannot be seen (see
        :attr:`optimizer_ids`)."""
        return None if self.optimizer_ids is None else id(param.tensor) in self.optimizer_ids

    def tensors(self) -> Iterator[tuple[torch.Tensor, bool]]:
        """Each parameter tensor once, in module order, and whether it holds only LoRA weights
        (an FSDP1 flat parameter holds several of :attr:`params`)."""
        lora: dict[int, bool] = {}
        order: dict[int, torch.Tensor] = {}
        for p in self.params:
            key = id(p.tensor)
            order.setdefault(key, p.tensor)
            lora[key] = lora.get(key, True) and p.role.is_lora
        for key, tensor in order.items():
            yield tensor, lora[key]


# --- wrappers ---------------------------------------------------------------------------------------
def unwrap_model(model: Any) -> Any:
    """The model under DDP, FSDP, DeepSpeed and ``torch.compile`` wrappers; when that is no peft
    model, the first peft model inside it (a LightningModule or a user's ``nn.Module`` holding
    one), else the model itself.

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
    while model is not None and seen < _MAX_WRAPPERS and not hasattr(model, "peft_config"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    if isinstance(model, nn.Module) and not hasattr(model, "peft_config"):
        return next((m for m in model.modules() if hasattr(m, "peft_config")), model)
    return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer (or any ``.optimizer`` wrapper)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer


def optimizer_chain(optimizer: Any) -> Iterator[Any]:
    """The optimizer and the ones it wraps through ``.optimizer`` (accelerate, DeepSpeed), outer
    first, at most four."""
    seen = 0
    while optimizer is not None and seen < 4:
        yield optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1


def _optimizer_param_ids(optimizer: Any) -> set[int]:
    """Ids of the model parameters an optimizer updates, through accelerate/DeepSpeed wrappers."""
    ids: set[int] = set()
    for opt in optimizer_chain(optimizer):
        for group in getattr(opt, "param_groups", None) or ():
            ids.update(id(p) for p in group.get("params", ()))
        for attr in ("bit16_groups", "fp16_groups"):  # DeepSpeed ZeRO keeps the model's params here
            for group in getattr(opt, attr, None) or ():
                ids.update(id(p) for p in group)
    return ids


def _configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The model's peft configs as dicts, by adapter name."""
    out: dict[str, dict[str, Any]] = {}
    for adapter, cfg in dict(getattr(model, "peft_config", None) or {}).items():
        to_dict = getattr(cfg, "to_dict", None)
        out[str(adapter)] = to_dict() if callable(to_dict) else dict(vars(cfg))
    return out


# --- the walk ---------------------------------------------------------------------------------------
def clean_name(name: str) -> str:
    """A parameter or module name without wrapper parts and peft's ``base_model.model.`` prefix.

    Example:
        >>> clean_name("module.base_model.model._orig_mod.layers.0.q_proj")
        'layers.0.q_proj'
    """
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name


def is_lora_layer(module: nn.Module) -> bool:
    """peft's ``LoraLayer``, or a layer that looks like one (Unsloth and other patched layers)."""
    if isinstance(module, _LORA_TYPES):
        return True
    if "lora_A" not in module._modules:  # the common case, without nn.Module's slow __getattr__
        return False
    return all(
        isinstance(getattr(module, attr, None), dict | nn.ModuleDict | nn.ParameterDict)
        for attr in ("r", "lora_alpha", "scaling")
    ) and (hasattr(module, "lora_A") and hasattr(module, "lora_B"))


def _walk(
    model: nn.Module,
) -> tuple[list[LayerView], list[tuple[str, torch.Tensor]], Records, list[str], bool | None]:
    """The one walk: LoRA layers, each parameter once with its first name (as
    ``named_modules()`` / ``named_parameters()`` give them), FSDP1 flat parameters' records
    from every name a flat parameter has (as ``named_parameters(remove_duplicate=False)``), the
    kinds of linear layers (see :attr:`ModelView.module_kinds`) and whether gradient
    checkpointing is on (see :attr:`ModelView.gradient_checkpointing`)."""
    layers: list[LayerView] = []
    named: list[tuple[str, torch.Tensor]] = []
    records: Records = {}
    kinds: dict[str, None] = {}
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    checkpointing: bool | None = None
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) not in seen_modules:
            seen_modules.add(id(module))
            # transformers sets the flag on the instance (a class default of False is off)
            flag = module.__dict__.get("gradient_checkpointing")
            if isinstance(flag, bool):
                checkpointing = flag or bool(checkpointing)
            if is_lora_layer(module):
                layers.append(_lora_layer(clean_name(prefix), module))
            kind = _linear_kind(prefix, module)
            if kind is not None:
                kinds.setdefault(kind, None)
        for key, p in module._parameters.items():  # what named_parameters() reads, per module
            if p is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            _add_records(records, name, p)
            if id(p) not in seen_params:
                seen_params.add(id(p))
                named.append((name, p))
    return layers, named, records, list(kinds), checkpointing


#: Output heads, never a LoRA target by their kind.
_HEADS = ("lm_head", "score", "classifier")


def _linear_kind(prefix: str, module: nn.Module) -> str | None:
    """The ``target_modules`` name of a linear layer (the base layer a LoRA module wraps is named
    by that module), None for other modules, LoRA's own layers and output heads."""
    if not (isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit")):
        return None
    parts = prefix.split(".")
    if parts[-1] == "base_layer":
        parts = parts[:-1]
    if not prefix or any(p.startswith("lora_") for p in parts) or parts[-1] in _HEADS:
        return None
    return parts[-1]


def _add_records(records: Records, name: str, p: torch.Tensor) -> None:
    """An FSDP1 flat parameter's originals: clean name -> (true shape, true numel)."""
    fqns, shapes = getattr(p, "_fqns", None), getattr(p, "_shapes", None)
    if fqns is None or shapes is None:
        return
    prefix = name.rsplit("_flat_param", 1)[0]
    for fqn, shape in zip(fqns, shapes, strict=False):
        dims = tuple(int(d) for d in shape)
        records[clean_name(prefix + fqn)] = (dims, math.prod(dims))


def _lora_layer(name: str, module: nn.Module) -> LayerView:
    get_base = getattr(module, "get_base_layer", None)
    base = get_base() if callable(get_base) else getattr(module, "base_layer", module)
    return LayerView(
        name=name,
        module=module,
        base=base,
        adapters=tuple(getattr(module, "r", {}) or {}),
        active=_active_adapters(module),
    )


def _active_adapters(module: nn.Module) -> frozenset[str] | None:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", None)
    if isinstance(active, str):
        return frozenset({active})
    return frozenset(str(a) for a in active) if isinstance(active, list | tuple | set) else None


def _lora_parts(layers: list[LayerView]) -> dict[int, tuple[Role, str]]:
    """Role and adapter of every parameter held by the LoRA layers' module dicts, by id."""
    parts: dict[int, tuple[Role, str]] = {}
    for layer in layers:
        for attr, role in _LORA_HOLDERS.items():
            holder = getattr(layer.module, attr, None)
            if isinstance(holder, nn.Module):
                for name, p in holder.named_parameters():
                    parts[id(p)] = (role, name.split(".", 1)[0])
    return parts


def _role_from_name(name: str) -> tuple[Role, str] | None:
    """A LoRA parameter's role and adapter from its name (``...lora_A.<adapter>.weight``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        role = _LORA_HOLDERS.get(part)
        if role is not None:
            return role, parts[i + 1]
    return None


def _param_views(
    name: str, p: torch.Tensor, records: Records, lora_parts: dict[int, tuple[Role, str]]
) -> Iterator[ParamView]:
    """One parameter as the view holds it; an FSDP1 flat parameter as its originals."""
    fqns, numels = getattr(p, "_fqns", None), getattr(p, "_numels", None)
    if fqns is not None and numels is not None:  # FSDP flat parameter (use_orig_params=False)
        prefix = name.rsplit("_flat_param", 1)[0]
        for fqn, n in zip(fqns, numels, strict=False):
            clean = clean_name(prefix + fqn)
            yield _param_view(clean, p, int(n), lora_parts)
        return
    clean = clean_name(name)
    yield _param_view(clean, p, _true_numel(p, records, clean), lora_parts)


def _param_view(
    name: str, p: torch.Tensor, numel: int, lora_parts: dict[int, tuple[Role, str]]
) -> ParamView:
    lora = _role_from_name(name) or lora_parts.get(id(p))
    if lora is not None:
        role, adapter = lora[0], lora[1]
    else:
        aux = any(marker in name for marker in _AUX_MARKERS)
        role, adapter = (Role.MODULES_TO_SAVE if aux else Role.BASE), None
    return ParamView(name, p, numel, bool(p.requires_grad), role, adapter)


def _true_numel(p: torch.Tensor, records: Records, name: str) -> int:
    """The logical element count of ``p``; a packed 4-bit weight counts twice its bytes."""
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


# --- tensors ----------------------------------------------------------------------------------------
def weight_of(holder: Any) -> torch.Tensor | None:
    """The weight of a LoRA A/B holder: the tensor itself, or a module's ``weight``."""
    if isinstance(holder, torch.Tensor):
        return holder
    w = getattr(holder, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def storage(param: torch.Tensor) -> tuple[str, int]:
    """A parameter's storage type label (``4-bit``, ``8-bit``, ``bf16`` ...) and its bytes on this
    device (ZeRO-3: its partition)."""
    local = getattr(param, "ds_tensor", None)
    tensor = local if local is not None else param
    size = int(tensor.numel()) * int(tensor.element_size())
    cls = type(param).__name__
    if cls == "Params4bit":
        return "4-bit", size
    if cls == "Int8Params" or param.dtype == torch.int8:
        return "8-bit", size
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return names.get(param.dtype, str(param.dtype).replace("torch.", "")), size
