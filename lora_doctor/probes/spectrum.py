"""Singular values of the learned LoRA update ``scaling * B @ A``, without forming it.

For ``B`` of shape ``(d_out, r)`` and ``A`` of shape ``(r, d_in)``, QR factorisations ``B = Qb Rb`` and
``A^T = Qa Ra`` give ``B @ A = Qb (Rb Ra^T) Qa^T`` with orthonormal ``Qb`` and ``Qa``, so the singular
values of ``B @ A`` are those of the ``r x r`` core ``Rb Ra^T``. Cost: two thin QRs (``O(d r^2)``) and
one ``r x r`` SVD, instead of ``O(d_out d_in r)`` to form the product and far more to decompose it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_doctor.checks.rank import summarise
from lora_doctor.config import DoctorConfig
from lora_doctor.facts import LayerSpectrum, SpectrumSnapshot
from lora_doctor.probes.base import Event, Probe
from lora_doctor.probes.budget import Ledger, TimeBudget, layers_to_read
from lora_doctor.probes.device import drain
from lora_doctor.probes.dist import world_size
from lora_doctor.probes.view import ModelView

__all__ = [
    "SpectrumProbe",
    "count_supervised_tokens",
    "lora_layers",
    "lowrank_singular_values",
    "reading_interval",
]


def lowrank_singular_values(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of ``scaling * b @ a``, largest first, in float32 on the tensors' device.

    Layers of the same shape may be stacked: ``b`` of shape ``(..., d_out, r)`` and ``a`` of shape
    ``(..., r, d_in)`` give ``(..., min(r, d_out, d_in))`` values, one row per layer.

    Args:
        b: the LoRA ``B`` factor(s).
        a: the LoRA ``A`` factor(s).
        scaling: peft's ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA).

    Example:
        >>> b, a = torch.randn(64, 4), torch.randn(4, 32)
        >>> s = lowrank_singular_values(b, a, 2.0)
        >>> torch.allclose(s, torch.linalg.svdvals(2.0 * b @ a)[:4], rtol=1e-4)
        True
    """
    b32 = b.detach().to(torch.float32)
    a32 = a.detach().to(torch.float32)
    rb = torch.linalg.qr(b32, mode="r").R
    ra = torch.linalg.qr(a32.transpose(-1, -2), mode="r").R
    core = rb @ ra.transpose(-1, -2)
    return torch.linalg.svdvals(core) * abs(float(scaling))


# --- reading the live model ---------------------------------------------------------------------
@dataclass
class _Layer:
    """One (LoRA module, adapter) pair and the parameters its update is made of."""

    name: str
    kind: str
    adapter: str
    r: int
    scaling: float
    a: torch.Tensor
    b: torch.Tensor
    base: Any
    #: the base weight's true element count (the same on every rank; 0 without a weight)
    base_numel: int = 0
    base_norm: float | None = None
    init_nonzero: bool = False


def lora_layers(model: Any) -> list[_Layer]:
    """Every (LoRA module, adapter) of ``model`` in module order: Linear, Conv and Embedding layers.

    Works on a model wrapped by DDP, FSDP or DeepSpeed; the order is the same on every rank.

    Example:
        >>> lora_layers(torch.nn.Linear(2, 2))
        []
    """
    return _layers_of(ModelView.build(model))


def _layers_of(view: ModelView) -> list[_Layer]:
    """The (LoRA module, adapter) pairs of a view whose A and B are there and whose r is positive."""
    out: list[_Layer] = []
    for layer in view.layers:
        ranks, scaling = getattr(layer.module, "r", {}), getattr(layer.module, "scaling", {})
        for adapter in layer.adapters:
            a, b = layer.weights(adapter)
            r = int(ranks[adapter] or 0)
            if a is None or b is None or r <= 0:
                continue
            weight = getattr(layer.base, "weight", None)
            out.append(
                _Layer(
                    name=layer.name,
                    kind=layer.name.rsplit(".", 1)[-1],
                    adapter=adapter,
                    r=r,
                    scaling=float(scaling.get(adapter, 1.0)),
                    a=a,
                    b=b,
                    base=layer.base,
                    base_numel=view.true_numel(weight, f"{layer.name}.base_layer.weight")
                    if isinstance(weight, torch.Tensor)
                    else 0,
                )
            )
    return out


@dataclass(frozen=True)
class _Prior:
    """What the spectrum's start-up and readings are assumed to cost before they are measured,
    in seconds: a conservative guess from measured figures, used only to decide whether the
    deferred start-up is affordable.

    Attributes:
        load: loading the device's linear-algebra libraries (the first reading in a process).
        layer: reading one layer's spectrum (two thin QRs and an ``r x r`` SVD: on an accelerator
            a run of small kernels, whose launches dominate up to several thousand wide).
        element: reading one base-weight element for its norm (a pass over the weight), the
            layer's kernel launches included.
    """

    load: float
    layer: float
    element: float

    def costs(self, layers: Sequence[_Layer], loaded: bool) -> tuple[float, float]:
        """The start-up's cost (the libraries unless ``loaded``, the base norms, a warm-up and a
        timed layer) and one layer's, in seconds, for ``layers`` (true sizes: the same on every
        rank)."""
        elements = sum(lay.base_numel for lay in layers)
        load = 0.0 if loaded else self.load
        return load + elements * self.element + 2 * self.layer, self.layer


#: Priors by device. An H200 (BENCHMARKS.md section 2, 0.95B Llama, 112 layers 2048 wide, r 16):
#: the first start-up in a process 0.17 s (library load), later ones 26-32 ms; 0.55-0.8 ms a
#: layer. A CPU core (hidden 2048, r 16, float32): 7 ms the first reading, 0.1-0.6 ms a layer,
#: 0.5-2 ns a base element. Any other device takes the accelerator's.
_PRIORS = {
    "cpu": _Prior(load=0.01, layer=1e-3, element=2e-9),
    "accelerator": _Prior(load=0.2, layer=1e-3, element=1e-11),
}

#: The device types on which this process has read a spectrum (their linear-algebra libraries
#: are loaded): a later run's prior leaves the load out. Every rank of a multi-process run reads
#: at the same steps, so it holds the same types.
_LOADED: set[str] = set()


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        try:
            from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
        except ImportError:
            return None
    return DTensor


@contextlib.contextmanager
def _full(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The full tensors of ``params``, gathered the same way on every rank.

    DeepSpeed ZeRO-3 partitions (``ds_id``): ``GatheredParameters`` (read-only). FSDP2 DTensors:
    ``full_tensor()``. Both are collective calls: every rank must walk the same layers in the same
    order, which :func:`lora_layers` guarantees. Plain tensors are yielded as they are.
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield [p.data for p in params]
        return
    dtensor = _dtensor_type()
    yield [
        p.detach().full_tensor() if dtensor is not None and isinstance(p, dtensor) else p.detach()  # type: ignore[attr-defined]
        for p in params
    ]


def _base_norm(base: Any) -> tuple[torch.Tensor | None, str]:
    """Frobenius norm of a frozen base layer's weight (gathered, 4-bit dequantized), as a float32
    scalar on its device (not yet fetched), and a note when it cannot be read."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, "no base weight"
    with _full([weight]) as (full,):
        if type(weight).__name__ in ("Params4bit", "Int8Params"):
            try:
                from peft.utils.integrations import dequantize_module_weight

                full = dequantize_module_weight(base)
            except Exception as exc:  # bitsandbytes missing or an unknown layout
                return None, f"quantized base weight not read ({type(exc).__name__})"
        if full.numel() == 0:
            return None, "base weight is a local shard (FSDP1 flat parameters)"
        return torch.linalg.vector_norm(full.detach().to(torch.float32)), ""


def _fetch(values: list[torch.Tensor | None]) -> list[float | None]:
    """The scalars ``values`` as floats, fetched from their devices at once (one device sync);
    None stays None."""
    present = [v for v in values if v is not None]
    if not present:
        return [None] * len(values)
    device = present[0].device
    fetched = iter(torch.stack([v.to(device, torch.float32) for v in present]).tolist())
    return [None if v is None else next(fetched) for v in values]


def reading_interval(config: DoctorConfig, max_steps: int) -> int:
    """Optimizer steps between planned spectrum readings: ``spectrum_every_steps``, else about
    ``spectrum_every_fraction`` of ``max_steps``; 0 (only the reading at the end) when neither is
    known. Each planned reading reads what the time budget has room for.

    Example:
        >>> reading_interval(DoctorConfig(), 600), reading_interval(DoctorConfig(), 0)
        (60, 0)
    """
    if config.spectrum_every_steps:
        return config.spectrum_every_steps
    return max(1, round(max_steps * config.spectrum_every_fraction)) if max_steps else 0


def count_supervised_tokens(dataset: Any, sample: int, seed: int = 0) -> tuple[int, bool] | None:
    """Tokens with a label other than -100 in ``dataset``: ``(count, sampled)``, or None if unknown.

    Reads ``labels`` (tokens other than -100), else a TRL ``completion_mask`` or
    ``assistant_masks``, else ``attention_mask`` or ``input_ids`` (a causal-LM collator labels every
    real token). Reads at most ``sample`` examples, drawn with a private random generator (the
    training's random state is untouched), and extrapolates to the whole set. An iterable dataset,
    which has no length, gives None.

    Example:
        >>> count_supervised_tokens([{"labels": [-100, 5, 6]}, {"labels": [7]}], sample=10)
        (3, False)
    """
    try:
        n = len(dataset)
    except TypeError:
        return None
    if n == 0:
        return None
    sampled = n > sample
    indices = random.Random(seed).sample(range(n), sample) if sampled else range(n)
    total, read = 0, 0
    for i in indices:
        count = _example_tokens(dataset[i])
        if count is None:
            return None
        total += count
        read += 1
    return round(total * n / read), sampled


def _example_tokens(example: Any) -> int | None:
    if not isinstance(example, Mapping):
        return None
    labels = example.get("labels")
    if labels is not None:
        return int((torch.as_tensor(labels) != -100).sum())
    for key in ("completion_mask", "assistant_masks", "attention_mask"):
        mask = example.get(key)
        if mask is not None:
            return int(torch.as_tensor(mask).sum())
    ids = example.get("input_ids")
    return int(torch.as_tensor(ids).numel()) if ids is not None else None


class SpectrumProbe(Probe):
    """Reads the spectrum of the layers' learned updates periodically and at the end, within the
    run's time budget.

    At ``train_begin``: takes the LoRA layers from the run's model view (:meth:`Event.model_view`),
    queues the peak of each layer's B on its device (whether B starts non-zero: it must be read
    before the first step; gathered under ZeRO-3 or FSDP2, fetched at the start-up) and counts the
    training set's supervised tokens. Every ``spectrum_every_steps`` optimizer steps (default:
    about a tenth of ``max_steps``) and at the end it plans a reading:
    :func:`~lora_doctor.probes.budget.layers_to_read` says how many layers the budget leaves room
    for (all of them, on long runs), taken in a fixed shuffled order that rotates from one reading
    to the next, so that every layer is read over the run; a reading for which fewer than
    ``spectrum_min_layers`` fit is skipped. Each reading adds a
    :class:`~lora_doctor.facts.SpectrumSnapshot` (with the layers it read) to the run's facts and
    puts per-kind ``lora_doctor/...`` metrics into the next log.

    The start-up: reads each frozen base weight's norm once (one layer at a time: gathered under
    ZeRO-3 or FSDP2, dequantized for 4-bit bases) and fetches it with B's initial peaks in one
    device sync; with a budget, reads one layer untimed (which loads the device's linear-algebra
    libraries: some 0.17 s on an H200, the first time in a process) and times the reading of one
    layer. With a limited budget it is deferred to the first planned reading the budget can afford:
    until then the decision uses a prior for the start-up's and a layer's cost (:data:`_PRIORS`,
    scaled by the base weights' true sizes, the library load left out once a spectrum was read in
    this process) and starts up only when the start-up and at least
    ``spectrum_min_layers`` layers fit, the final reading at ``max_steps`` still left room for; a
    run too short for any reading never pays for it (nor reads, as before). A single process then
    decides the reading again from the measured costs, so long runs read as they did with the
    start-up at ``train_begin``. Without a budget, or without a limit, it starts up at
    ``train_begin`` and every planned reading reads every layer.

    The budget is the event's (:attr:`Event.budget`, the callback's); without one nothing is timed.
    Every rank walks the same layers at the same steps, so the gathers (collective calls) match:
    with several processes the decisions come from the numbers exchanged at the latest log, which
    every rank holds alike, and the priors, which rest on the layers' true sizes, the same on every
    rank; so the start-up (gathers under ZeRO-3 and FSDP2) happens at the same step on every rank,
    and the reading at that step is decided from the prior per-layer cost (a rank's measured cost
    reaches the others at the next log). The arithmetic runs on every rank, which needs no further
    communication.
    """

    name = "spectrum"

    def __init__(self, config: DoctorConfig) -> None:
        self.config = config
        self._layers: list[_Layer] = []
        #: The order the layers are read in when a reading reads some of them, and where the
        #: next such reading starts.
        self._order: list[int] = []
        self._cursor = 0
        self._every = 0
        self._max_steps = 0
        self._planned_step = -1
        self._pending: dict[str, float] = {}
        #: Several processes: decisions from the exchanged numbers, and the estimated cost of the
        #: readings decided since those were taken, by step.
        self._shared = False
        self._decided: list[tuple[int, float]] = []
        #: B's peak per layer at train_begin, on its device until the start-up fetches it
        self._peaks: list[torch.Tensor | None] = []
        self._started = False
        #: the prior costs of the start-up and of one layer's reading, in seconds
        self._prior = (0.0, 0.0)

    def train_begin(self, event: Event) -> None:
        budget = event.budget
        t0 = budget.clock() if budget is not None else 0.0
        facts = event.doctor.facts
        if event.model is not None:
            self._layers = _layers_of(event.model_view())
        self._order = list(range(len(self._layers)))
        random.Random(0).shuffle(self._order)  # the same on every rank
        self._shared = world_size() > 1
        if self._layers:
            device = self._layers[0].a.device.type
            prior = _PRIORS["cpu" if device == "cpu" else "accelerator"]
            self._prior = prior.costs(self._layers, loaded=device in _LOADED)
        with torch.no_grad():
            self._peaks = self._initial_peaks()
        self._max_steps = int(getattr(event.state, "max_steps", 0) or 0)
        cfg = self.config
        self._every = reading_interval(cfg, self._max_steps)
        loader = event.kwargs.get("train_dataloader")
        try:  # local work: an error here must not drop the probe on one rank only
            counted = count_supervised_tokens(
                getattr(loader, "dataset", None), cfg.token_count_sample
            )
        except Exception as exc:
            counted = None
            facts.spectrum_notes.append(f"supervised tokens not counted ({type(exc).__name__})")
        if counted is not None:
            facts.supervised_tokens, facts.supervised_tokens_sampled = counted
        if budget is not None:
            budget.spectrum(budget.clock() - t0, event.step)
        if budget is None or budget.share is None:
            self._start_up(event)

    def _initial_peaks(self) -> list[torch.Tensor | None]:
        """Each layer's ``max |B|`` now, queued on its device (not fetched: no device sync)."""
        peaks: list[torch.Tensor | None] = []
        for layer in self._layers:
            with _full([layer.b]) as (b,):
                peaks.append(b.detach().abs().amax() if b.numel() else None)
        return peaks

    def _start_up(self, event: Event) -> None:
        """Reads each layer's base weight norm and fetches it with B's initial peak (one device
        sync for all layers), noting what could not be read; with a budget, loads the device's
        linear-algebra libraries and times one layer (:meth:`_calibrate`). Gathers under ZeRO-3
        and FSDP2: run alike on every rank."""
        self._started = True
        if not self._layers:
            return
        budget, step = event.budget, event.step
        t0 = budget.clock() if budget is not None else 0.0
        waited = drain(budget, [self._layers[0].a], step)
        notes: list[str] = []
        norms: list[torch.Tensor | None] = []
        with torch.no_grad():
            for layer in self._layers:
                norm, note = _base_norm(layer.base)
                norms.append(norm)
                if note:
                    notes.append(f"{layer.name}: {note}")
        values = _fetch(norms + self._peaks)
        self._peaks = []
        for i, layer in enumerate(self._layers):
            layer.base_norm = values[i]
            peak = values[len(self._layers) + i]
            layer.init_nonzero = peak is not None and peak > 0
        event.doctor.facts.spectrum_notes.extend(notes[:20])
        if budget is not None:
            self._read(self._layers[:1])  # loads the device's linear-algebra libraries
            budget.spectrum(budget.clock() - t0 - waited, step)
            self._calibrate(budget, step)

    def _calibrate(self, budget: TimeBudget, step: int) -> None:
        """Measures what reading one layer costs, on the first layer (read once before, which
        loaded the device's linear-algebra libraries). A collective under ZeRO-3 and FSDP, run
        alike on every rank."""
        first = self._layers[:1]
        t0 = budget.clock()
        waited = drain(budget, [first[0].a], step)
        self._read(first)
        budget.spectrum(budget.clock() - t0 - waited, step, layers=1)

    def step_end(self, event: Event) -> None:
        if self._every and self._layers and event.step % self._every == 0:
            self._planned(event, final=bool(self._max_steps) and event.step >= self._max_steps)

    def log(self, event: Event) -> None:
        if self._pending and event.logs is not None:
            event.logs.update(self._pending)
            self._pending = {}

    def train_end(self, event: Event) -> None:
        if self._layers and event.step != self._planned_step:
            self._planned(event, final=True)

    def _planned(self, event: Event, final: bool) -> None:
        """A planned reading: as many layers as the budget has room for, or none. ``final``: the
        reading at the end of training, which needs to leave no room for another."""
        self._planned_step = event.step
        count = self._count(event, final)
        if event.budget is not None:
            event.budget.facts.spectrum_planned += 1
            event.budget.facts.spectrum_skipped += count == 0
        if count == 0:
            return
        if count >= len(self._layers):
            self.snapshot(event)
            return
        n = len(self._layers)
        picked = sorted(self._order[(self._cursor + i) % n] for i in range(count))
        self._cursor = (self._cursor + count) % n
        self.snapshot(event, [self._layers[i] for i in picked])

    def _count(self, event: Event, final: bool) -> int:
        """How many layers the planned reading at this step reads (the same on every rank)."""
        budget, total = event.budget, len(self._layers)
        if budget is None or budget.share is None:
            return total
        pending = 0.0
        if self._shared:  # from the numbers every rank holds alike
            ranks = event.ranks
            ledger = Ledger.from_spread(ranks.spread) if ranks is not None else None
            if ledger is None:
                return 0
            pending = sum(cost for step, cost in self._decided if step > ledger.step)
        else:
            ledger = budget.ledger(event.step)
        start_up, layer = self._prior
        if ledger.layer_seconds is None:  # not measured yet (or not yet exchanged)
            ledger = dataclasses.replace(ledger, layer_seconds=layer)
        started, share = self._started, budget.share
        count = self._fits(ledger, share, event.step, final, pending + (0 if started else start_up))
        if count and not started:
            facts = budget.facts
            before = facts.spectrum_seconds + facts.waited_seconds
            self._start_up(event)
            if not self._shared:  # decide again from what it measured, not yet charged
                paid = facts.spectrum_seconds + facts.waited_seconds - before
                count = self._fits(budget.ledger(event.step), share, event.step, final, paid)
        if self._shared and count:
            cost = count * (ledger.layer_seconds or 0.0) + (0.0 if started else start_up)
            self._decided.append((event.step, cost))
        return count

    def _fits(self, ledger: Ledger, share: float, step: int, final: bool, pending: float) -> int:
        """:func:`~lora_doctor.probes.budget.layers_to_read` with this run's numbers."""
        return layers_to_read(
            ledger,
            share=share,
            step=step,
            max_steps=self._max_steps,
            total=len(self._layers),
            minimum=self.config.spectrum_min_layers,
            final=final,
            pending=pending,
        )

    def snapshot(self, event: Event, layers: Sequence[_Layer] | None = None) -> SpectrumSnapshot:
        """Reads the spectrum of ``layers`` (every layer when None) now and records it in the
        run's facts; with a budget, records what the reading cost."""
        chosen = self._layers if layers is None else list(layers)
        budget = event.budget
        if budget is not None:
            t0 = budget.clock()
            waited = drain(budget, [lay.a for lay in chosen[:1]], event.step)
            read = self._read(chosen)
            budget.spectrum(budget.clock() - t0 - waited, event.step, layers=len(chosen))
        else:
            read = self._read(chosen)
        snap = SpectrumSnapshot(
            step=event.step,
            kinds=summarise(read, self.config.rank_noise_floor),
            layers=read,
            layers_read=len(read),
            layers_total=len(self._layers),
        )
        history = event.doctor.facts.spectrum
        # Per-layer values and the per-kind normalised spectra: the latest reading's only (the
        # rank checks read the latest layers and the previous reading's used ranks); every
        # reading keeps its per-kind summary.
        for old in history:
            old.layers = []
            for summary in old.kinds.values():
                summary.pop("spectrum", None)
        history.append(snap)
        self._pending = _metrics(snap)
        return snap

    def _read(self, layers: Sequence[_Layer]) -> list[LayerSpectrum]:
        """The spectra of the readable ``layers``: computed on the parameters' device, fetched at
        once."""
        parts: list[torch.Tensor] = []
        read: list[_Layer] = []
        with torch.no_grad():
            for layer in layers:
                with _full([layer.a, layer.b]) as (a, b):
                    a2, b2 = a.reshape(layer.r, -1), b.reshape(b.shape[0], -1)
                    if a2.numel() == 0 or b2.shape[-1] != layer.r:
                        continue  # an FSDP1 flat-parameter shard: not readable here
                    try:  # local arithmetic: the other layers' gathers must still run
                        sv = lowrank_singular_values(b2, a2, layer.scaling)
                        b_norm = torch.linalg.vector_norm(b2.to(torch.float32)).reshape(1)
                    except RuntimeError:  # e.g. a non-finite factor the QR cannot take
                        continue
                    parts.append(torch.cat([b_norm, sv]))
                    read.append(layer)
        if not parts:
            return []
        _LOADED.add(parts[0].device.type)
        flat = torch.cat([p.to(parts[0].device) for p in parts]).cpu().tolist()
        out: list[LayerSpectrum] = []
        start = 0
        for layer, part in zip(read, parts, strict=True):
            values = [float(v) for v in flat[start : start + part.numel()]]
            start += part.numel()
            delta = math.sqrt(sum(v * v for v in values[1:]))
            out.append(
                LayerSpectrum(
                    name=layer.name,
                    kind=layer.kind,
                    adapter=layer.adapter,
                    r=layer.r,
                    singular_values=values[1:],
                    b_norm=values[0],
                    relative_update=delta / layer.base_norm if layer.base_norm else None,
                    init_nonzero=layer.init_nonzero,
                )
            )
        return out


def _metrics(snap: SpectrumSnapshot) -> dict[str, float]:
    """Per-kind ``lora_doctor/...`` metrics of a snapshot for the Trainer's logs."""
    out: dict[str, float] = {}
    for kind, s in snap.kinds.items():
        for key in (
            "effective_rank",
            "stable_rank",
            "used_rank",
            "min_over_max",
            "relative_update",
        ):
            value = s.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"lora_doctor/{key}/{kind}"] = round(float(value), 6)
    return out
