"""PyTorch Lightning: ``LoraDoctor``, a Lightning callback over the same engine and probes.

A thin adapter, like the Trainer callback: each Lightning hook hands what it offers to a
:class:`~lora_doctor.integrations.loop.LoopDoctor` (the custom-loop adapter), which runs the
probes and the checks. Following Lightning's own ``EarlyStopping``: the state goes into the
checkpoint (``state_dict``/``load_state_dict``), the ``stop_on`` decision is reduced across
processes (any process that finds it stops them all), only rank zero logs and writes the JSON.

Install with ``pip install 'lora-doctor[lightning]'``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as err:  # the extra is not installed: one line with the fix
    raise ModuleNotFoundError(
        "lora_doctor.lightning needs PyTorch Lightning, which is not installed: "
        "pip install 'lora-doctor[lightning]'",
        name=err.name,
    ) from None

from lora_doctor.checks import Check
from lora_doctor.config import DoctorConfig
from lora_doctor.integrations.loop import LoopDoctor, check_options, guarded_hook, resolve_config
from lora_doctor.probes.memory import MemoryReader
from lora_doctor.report import REPORT_NAME

__all__ = ["DEFAULT_METRICS", "LoraDoctor"]

logger = logging.getLogger("lora_doctor")


#: Metric names a LightningModule commonly logs, and the doctor's name for each: ``loss``,
#: ``grad_norm`` and ``learning_rate`` feed the training curves, ``eval_...`` the evaluation
#: checks. A name logged with ``on_step=True, on_epoch=True`` is read in its ``_step`` form.
DEFAULT_METRICS: Mapping[str, str] = {
    "loss": "loss",
    "train_loss": "loss",
    "train/loss": "loss",
    "training_loss": "loss",
    "grad_norm": "grad_norm",
    "train/grad_norm": "grad_norm",
    "val_loss": "eval_loss",
    "val/loss": "eval_loss",
    "valid_loss": "eval_loss",
    "validation_loss": "eval_loss",
    "eval_loss": "eval_loss",
}


class LoraDoctor(Callback):
    """Diagnoses a LoRA run trained with PyTorch Lightning.

    Add it to the ``Trainer``'s callbacks. It reads the LoRA adapter of the LightningModule (a
    ``peft`` model anywhere inside it) and its optimizer when training starts, follows the
    adapters through the first optimizer steps, reads the metrics the module logs (at the
    Trainer's ``log_every_n_steps``) and its validation metrics, and writes
    ``<default_root_dir>/lora_doctor.json`` at the end and when training dies.

    Args:
        report_path: where the diagnosis JSON goes; ``<trainer.default_root_dir>/lora_doctor.json``
            when None. ``False`` writes no file.
        metrics: your metric names and the doctor's name for each, over :data:`DEFAULT_METRICS`
            (``{"my_loss": "loss", "val_ppl": None}``: ``None`` drops a default). The doctor's
            names: ``loss``, ``grad_norm``, ``learning_rate``, and ``eval_loss`` (or any
            ``eval_...``) for validation metrics. The learning rate is read from the optimizer.
        ignore: finding slugs (or codes) never to report.
        stop_on: finding slugs (or codes) that stop training when found on any process.
        check_after_steps: optimizer steps after which the adapter is checked for gradients,
            movement and shapes (default 2).
        alerts: also send each warning or error finding as a W&B alert while a W&B run is active
            (a ``WandbLogger``'s, once it has started).
        config: every other threshold, as a :class:`~lora_doctor.DoctorConfig` (or a dict of its
            fields); the options above take precedence over its fields.
        memory_reader: reads device memory; the CUDA allocator's counters when None.
        extra_checks: your own :class:`~lora_doctor.checks.Check` classes.

    Raises:
        ValueError: for an option of the wrong type or a finding name no check reports.

    Example:
        >>> from lora_doctor.lightning import LoraDoctor
        >>> trainer = lightning.Trainer(max_steps=500, callbacks=[LoraDoctor()])  # doctest: +SKIP
        >>> trainer.fit(module, train_loader, val_loader)  # doctest: +SKIP
    """

    def __init__(
        self,
        report_path: str | os.PathLike[str] | bool | None = None,
        *,
        metrics: Mapping[str, str | None] | None = None,
        ignore: Iterable[str] | None = None,
        stop_on: Iterable[str] | None = None,
        check_after_steps: int | None = None,
        alerts: bool | None = None,
        config: DoctorConfig | Mapping[str, Any] | None = None,
        memory_reader: MemoryReader | None = None,
        extra_checks: Iterable[type[Check]] = (),
    ) -> None:
        if isinstance(config, Mapping):
            config = DoctorConfig(**config)
        check_options("LoraDoctor", config, report_path, "<default_root_dir>")
        names = {**DEFAULT_METRICS, **dict(metrics or {})}
        if not all(
            isinstance(k, str) and isinstance(v, (str, type(None))) for k, v in names.items()
        ):
            raise ValueError(
                "LoraDoctor(metrics=...) maps your metric names to the doctor's (str to str, or "
                f"to None to drop a default), got {metrics!r}"
            )
        self.metrics = {k: v for k, v in names.items() if v is not None}
        overrides: dict[str, Any] = {
            k: v
            for k, v in (
                ("ignore", ignore),
                ("stop_on", stop_on),
                ("check_after_steps", check_after_steps),
                ("alerts", alerts),
            )
            if v is not None
        }
        self.extra_checks = tuple(extra_checks)
        self.config = resolve_config(config, overrides, self.extra_checks)
        self.report_path = report_path
        self.memory_reader = memory_reader
        self.loop: LoopDoctor | None = None
        self._saved: Mapping[str, Any] | None = None
        self._stepped = 0
        self._stopped = False
        self._broken = False
        self._off: set[str] = set()

    # --- Lightning hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.loop = None  # a new fit: every part on again
        self._broken = False
        self._off.clear()
        self._stopped = False
        self._stepped = int(trainer.global_step)
        self._start(trainer, pl_module)

    @guarded_hook
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.loop is not None:
            self.loop.on_before_optimizer_step()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if step <= self._stepped:  # a micro-batch of gradient accumulation: no optimizer step
            return
        self._stepped = step
        every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
        logs = every > 0 and step % every == 0  # the steps Lightning logs at
        self._batch_end(trainer, step, logs)
        if logs:  # every process, at the same steps, whatever state its doctor is in
            self._reduce_stop(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._validation_end(trainer)
        self._reduce_stop(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.loop is not None:
            self.loop.on_train_end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.loop is None:  # died before training started (sanity check, set-up)
            self._start(trainer, pl_module)
        if self.loop is not None:
            self.loop.on_exception(exception)

    # --- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The doctor's state for Lightning's checkpoint: facts, findings reported, and the
        metrics recorded (a resumed run judges the whole curve and reports nothing twice)."""
        if self.loop is not None:
            return self.loop.state_dict()
        return dict(self._saved or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Takes back :meth:`state_dict` from a checkpoint; applied when training starts."""
        self._saved = state_dict

    # --- plumbing ---------------------------------------------------------------------------------
    @guarded_hook
    def _start(self, trainer: Any, pl_module: Any) -> None:
        """Builds the run's LoopDoctor from the Trainer and the module, and starts it."""
        optimizers = list(getattr(trainer, "optimizers", None) or ())
        max_steps = int(trainer.max_steps or -1)
        if max_steps <= 0:
            estimated = float(getattr(trainer, "estimated_stepping_batches", math.inf))
            max_steps = int(estimated) if math.isfinite(estimated) else 0
        loader = getattr(trainer, "train_dataloader", None)
        self.loop = LoopDoctor(
            pl_module,
            optimizers[0] if len(optimizers) == 1 else None,
            report_path=self._report_target(trainer),
            config=self.config,
            train_dataloader=loader if hasattr(loader, "dataset") else None,
            memory_reader=self.memory_reader,
            extra_checks=self.extra_checks,
            is_main=bool(trainer.is_global_zero),
            max_steps=max_steps,
            num_train_epochs=trainer.max_epochs if (trainer.max_epochs or -1) > 0 else None,
        )
        if self._saved:
            self.loop.load_state_dict(self._saved)
        self.loop.on_train_start()

    @guarded_hook
    def _batch_end(self, trainer: Any, step: int, logs: bool) -> None:
        if self.loop is not None:
            metrics = self._read(trainer.callback_metrics, train=True) if logs else None
            self.loop.on_train_batch_end(metrics or None, step=step)

    @guarded_hook
    def _validation_end(self, trainer: Any) -> None:
        metrics = self._read(trainer.callback_metrics, train=False)
        if self.loop is not None and metrics:
            self.loop.on_validation_end(metrics, step=int(trainer.global_step))

    def _read(self, logged: Mapping[str, Any], train: bool) -> dict[str, Any]:
        """The logged metrics the doctor knows, under its names: the training ones or the
        evaluation ones (``eval_...``). A ``<name>_step`` value wins over ``<name>``; epoch
        aggregates (``<name>_epoch``) are not step values and are left out."""
        out: dict[str, Any] = {}
        for key in sorted(logged, key=lambda k: k.endswith("_step")):  # _step forms last: they win
            if key.endswith("_epoch"):
                continue
            name = self.metrics.get(key.removesuffix("_step") if train else key)
            if name is not None and name.startswith("eval_") is not train:
                out[name] = logged[key]
        return out

    def _reduce_stop(self, trainer: Any) -> None:
        """Stops every process once a ``stop_on`` finding is reported on any (a collective under
        DDP: called on every process at the same points, as EarlyStopping does)."""
        if not self.config.stop_on or self._stopped:
            return
        local = self.loop is not None and self.loop.should_stop
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        self._stopped = True
        trainer.should_stop = True
        reason = self.loop.doctor.stop_reason if self.loop is not None else None
        if trainer.is_global_zero:
            logger.warning(
                "lora-doctor: stopping training at step %s because of %s, as asked by stop_on.",
                trainer.global_step,
                f"{reason.slug} ({reason.code})" if reason is not None else "a finding",
            )

    def _report_target(self, trainer: Any) -> Path | None:
        if isinstance(self.report_path, bool):
            return None
        if self.report_path:
            return Path(self.report_path)
        return Path(trainer.default_root_dir) / REPORT_NAME
