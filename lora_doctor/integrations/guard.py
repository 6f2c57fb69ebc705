"""A guard around ``trainer.train``: hears of a run before it starts and of errors that kill it.

Some failures never reach a callback event: a resume with another LoRA rank dies inside
``trainer.train(resume_from_checkpoint=...)`` while loading the checkpoint, before ``on_train_begin``;
a CUDA out-of-memory error leaves the loop without ``on_train_end``. The guard wraps the ``train``
method of one Trainer instance (not the class) so that listeners hear of the call and of an exception
escaping it; the exception itself is re-raised unchanged. Listeners are keyed, so a callback that
transformers rebuilds from a checkpoint replaces its earlier self instead of adding a second listener.

The callback installs the guard when it first sees its Trainer (``on_init_end`` when passed as
``callbacks=[...]``, else ``on_train_begin``). A listener that raises is logged once and dropped; it
never hides the training error.

A guard installed in ``on_train_begin`` (a callback added with ``trainer.add_callback``) comes too
late for the ``train`` call already running; for that call the callback guards the instance's
``training_step`` (forward and backward, where nearly every out-of-memory error happens) with
:func:`guard_steps`, and drops that step guard when the next ``train`` call starts guarded.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["TrainGuard", "find_trainer", "guard_steps", "install", "is_installed", "unguard_steps"]

logger = logging.getLogger("lora_doctor")

_ATTR = "_lora_doctor_guard"

#: ``before(trainer, resume_from_checkpoint)``: called when ``train`` is called, before it runs.
BeforeListener = Callable[[Any, Any], None]
#: ``failed(trainer, exc)``: called with the exception escaping ``train``, before it propagates.
FailedListener = Callable[[Any, BaseException], None]


class TrainGuard:
    """The listeners of one Trainer's ``train`` calls (see :func:`install`)."""

    def __init__(self) -> None:
        self.before: dict[str, BeforeListener] = {}
        self.failed: dict[str, FailedListener] = {}
        #: The ``resume_from_checkpoint`` of the latest ``train`` call (callbacks that transformers
        #: rebuilds from a checkpoint read it here, having missed the call).
        self.resume: Any = None

    def _notify(self, listeners: dict[str, Callable[..., None]], *args: Any) -> None:
        for key, fn in list(listeners.items()):
            try:
                fn(*args)
            except Exception:
                listeners.pop(key, None)
                logger.warning(
                    "lora-doctor: internal error in %s; it is switched off, training is not affected.",
                    key,
                    exc_info=True,
                )


def install(trainer: Any) -> TrainGuard:
    """Wraps ``trainer.train`` once and returns its guard, to which listeners are added by key.

    Example:
        >>> guard = install(trainer)  # doctest: +SKIP
        >>> guard.failed["lora_doctor"] = lambda trainer, exc: print("died of", exc)  # doctest: +SKIP
    """
    guard = trainer.__dict__.get(_ATTR)
    if isinstance(guard, TrainGuard):
        return guard
    guard = TrainGuard()
    original = trainer.train

    @functools.wraps(original)
    def train(*args: Any, **kwargs: Any) -> Any:
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        guard.resume = resume
        guard._notify(guard.before, trainer, resume)
        try:
            return original(*args, **kwargs)
        except BaseException as exc:
            guard._notify(guard.failed, trainer, exc)
            raise

    trainer.__dict__[_ATTR] = guard
    trainer.train = train
    return guard


def is_installed(trainer: Any) -> bool:
    """True when ``trainer.train`` is already guarded."""
    return isinstance(trainer.__dict__.get(_ATTR), TrainGuard)


def guard_steps(trainer: Any, failed: FailedListener) -> None:
    """Wraps the instance's ``training_step`` so that ``failed(trainer, exc)`` hears of an error
    escaping it, before the error goes on unchanged (for a ``train`` call that began unguarded).

    A listener that raises is logged and never hides the training error.
    """
    current = trainer.__dict__.get("training_step")
    if current is not None and getattr(current, _ATTR, False):
        return
    original = trainer.training_step

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except BaseException as exc:
            try:
                failed(trainer, exc)
            except Exception:
                logger.warning(
                    "lora-doctor: internal error while recording a training error; the error "
                    "itself goes on unchanged.",
                    exc_info=True,
                )
            raise

    setattr(training_step, _ATTR, True)
    trainer.training_step = training_step


def unguard_steps(trainer: Any) -> None:
    """Removes the step guard of :func:`guard_steps`, if there is one."""
    current = trainer.__dict__.get("training_step")
    if current is not None and getattr(current, _ATTR, False):
        del trainer.__dict__["training_step"]


def find_trainer(max_depth: int = 12) -> Any:
    """The ``transformers.Trainer`` whose code is running up the call stack, or None.

    A callback's events carry no reference to the Trainer; the Trainer is the ``self`` of the frame
    that called the callback handler (``Trainer.__init__`` for ``on_init_end``,
    ``_inner_training_loop`` for ``on_train_begin``).
    """
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover - transformers is there whenever a callback runs
        return None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None
