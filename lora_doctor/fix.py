"""Applying a diagnosis: the findings' ``config_changes`` merged, checked and set on copies of the
user's ``LoraConfig`` and ``TrainingArguments``, with the steps that are not configuration.

Rules (:func:`apply_findings`, behind :meth:`lora_doctor.report.Diagnosis.apply`):

- **What is applied.** The recommendations of findings at warning or error. An information
  finding's changes (``rank-underused``'s smaller rank, ``attention-only-targets``'s
  ``"all-linear"``) are suggestions for a next run, not fixes: they are listed as dropped, and
  applied only when asked (``suggestions=True``, or the slugs whose suggestions to follow),
  after every warning and error, by the same rules.
- **Order and conflicts.** Errors before warnings. Within a severity, findings judged on the run
  (with a step) before those made at set-up, before training: a symptom's learning rate read from
  where this run learned best before ``learning-rate-too-high``'s usual rate; then the order
  found. A warning or error judged on the run whose most likely cause (``evidence.causes``) is a
  set-up finding ranks with that finding's severity when it is higher (the same fault, seen with
  more of the run). A finding's changes are taken whole or not at all: they are meant together
  (``r`` with ``lora_alpha``, ``bf16`` with ``fp16``, a batch size with its accumulation steps),
  so when one of its fields is already set to another value by a finding that ranks before it,
  all of its changes are dropped, each with the winning finding named. A field two findings set
  to the same value is no conflict.
- **Routing.** Each key goes to the object whose class has a field of that name, and its value
  must have the type the class annotates (an ``int`` is a ``float``; a ``bool`` is not an
  ``int``; an enum field takes its values' strings). With an object given, its own class decides:
  a ``TrainingArguments`` subclass such as TRL's ``SFTConfig`` brings its fields, and a field
  transformers renamed (:data:`RENAMED`) is set under the name the class has, the new one when it
  has both. Without one, :data:`KNOWN_FIELDS` decides: the fields the doctor's fixes set, with the
  types peft's ``LoraConfig`` and transformers' ``TrainingArguments`` declare
  (``tests/test_fix_fields.py`` holds the table to the installed classes). A key neither object
  has, or a value of the wrong type, is reported in ``unrouted``, not applied.
- **Copies.** Each object is copied with :func:`dataclasses.replace`, one finding's changes at a
  time, so the class validates them (its ``__post_init__`` runs); changes the class refuses, or
  does not keep (a field read back with another value), are reported in ``unrouted`` with the
  reason, and the copy keeps the changes before them. The objects passed in are never modified;
  the result holds new objects even when nothing changed.
- **Step counts follow the learning rate.** A ``max_steps`` a finding measured on this run's
  trajectory (``overfit``: the step of the best evaluation) holds at this run's learning rate
  only: when another finding changes ``learning_rate``, the new run reaches that point at another
  step, so ``max_steps`` is dropped (with the finding that changes the rate named) and the rest
  of its finding's changes, such as keeping the best checkpoint, still apply.
- **Steps.** The steps of the findings followed, in order, without those that only set a field
  this result sets ("Set lora_alpha=32 in LoraConfig"): what is left is what configuration cannot
  do (restart from the base model, fix the data, add a callback).

Needs neither torch nor peft nor transformers: it works on any dataclass. Source: DESIGN.md, "A fix
must work"; the fix loop of ``benchmarks/faults`` (``--fix-loop``) applies these rules to real runs.

Example:
    >>> from lora_doctor.findings import Finding, Recommendation, Severity
    >>> fix = Recommendation("Raise it", ("Set learning_rate=0.0002",), {"learning_rate": 2e-4})
    >>> flat = Finding("LD201", "loss-plateau", Severity.WARNING, 40, "flat", "m", {}, fix)
    >>> apply_findings([flat]).config_changes()
    {'TrainingArguments': {'learning_rate': 0.0002}}
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import re
import types
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lora_doctor._version import __version__
from lora_doctor.findings import Finding, Recommendation, Severity, to_jsonable

__all__ = [
    "KNOWN_FIELDS",
    "LORA_CONFIG",
    "RENAMED",
    "TRAINING_ARGUMENTS",
    "AppliedFix",
    "Change",
    "Skipped",
    "apply_findings",
    "fits",
]

LORA_CONFIG, TRAINING_ARGUMENTS = "LoraConfig", "TrainingArguments"
FIX_SCHEMA_VERSION = 1

#: Where each field the doctor's fixes set lives, and its type as peft 0.21's ``LoraConfig`` and
#: transformers 5's ``TrainingArguments`` annotate it (an enum field as ``str``, a field that also
#: takes ``None`` as the doctor sets it). Routes the changes when no object is given.
KNOWN_FIELDS: dict[str, tuple[str, Any]] = {
    "r": (LORA_CONFIG, int),
    "lora_alpha": (LORA_CONFIG, int),
    "lora_dropout": (LORA_CONFIG, float),
    "target_modules": (LORA_CONFIG, str | list[str]),
    "use_dora": (LORA_CONFIG, bool),
    "init_lora_weights": (LORA_CONFIG, bool),
    "learning_rate": (TRAINING_ARGUMENTS, float),
    "max_grad_norm": (TRAINING_ARGUMENTS, float),
    "weight_decay": (TRAINING_ARGUMENTS, float),
    "bf16": (TRAINING_ARGUMENTS, bool),
    "fp16": (TRAINING_ARGUMENTS, bool),
    "gradient_checkpointing": (TRAINING_ARGUMENTS, bool),
    "gradient_checkpointing_kwargs": (TRAINING_ARGUMENTS, dict[str, Any]),
    "activation_checkpointing": (TRAINING_ARGUMENTS, bool),
    "activation_checkpointing_kwargs": (TRAINING_ARGUMENTS, dict[str, Any]),
    "ddp_find_unused_parameters": (TRAINING_ARGUMENTS, bool),
    "per_device_train_batch_size": (TRAINING_ARGUMENTS, int),
    "gradient_accumulation_steps": (TRAINING_ARGUMENTS, int),
    "logging_nan_inf_filter": (TRAINING_ARGUMENTS, bool),
    "load_best_model_at_end": (TRAINING_ARGUMENTS, bool),
    "metric_for_best_model": (TRAINING_ARGUMENTS, str),
    "save_strategy": (TRAINING_ARGUMENTS, str),
    "max_steps": (TRAINING_ARGUMENTS, int),
}


def fits(value: Any, hint: Any) -> bool:
    """True when ``value`` has the type ``hint`` declares.

    Reads what dataclass annotations use: classes, ``X | Y`` and ``Optional``, ``Literal``,
    ``list[X]``, ``set[X]``, ``tuple[X, ...]``, ``dict[K, V]`` and ``Any``. An ``int`` fits
    ``float``; a ``bool`` fits neither ``int`` nor ``float``; an enum class takes its members and
    their values. A hint of another form (a type variable, an unresolved name) refuses nothing:
    the class's own validation still runs when the object is copied.

    Example:
        >>> fits(16, int), fits(True, int), fits(2, float), fits(["q_proj"], str | list[str])
        (True, False, True, True)
    """
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (list, set, frozenset, collections.abc.Sequence):
        container = list if origin is collections.abc.Sequence else origin
        return isinstance(value, container) and all(fits(v, args[0]) for v in value if args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(map(fits, value, args)))
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (
            not args or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
        )
    if not isinstance(hint, type):
        return True
    if issubclass(hint, enum.Enum):
        return isinstance(value, hint) or any(value == m.value for m in hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclass(frozen=True)
class Change:
    """One field to set, and the finding that asks for it.

    Attributes:
        target: ``"LoraConfig"`` or ``"TrainingArguments"`` (``""`` when it routes nowhere).
        field: the field's name, e.g. ``"lora_alpha"``.
        value: the value to set.
        code, slug, severity: the finding's.
    """

    target: str
    field: str
    value: Any
    code: str
    slug: str
    severity: Severity

    def assignment(self) -> str:
        """``field=value`` as Python code."""
        return f"{self.field}={self.value!r}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "field": self.field,
            "value": to_jsonable(self.value),
            "code": self.code,
            "slug": self.slug,
            "severity": self.severity.value,
        }


@dataclass(frozen=True)
class Skipped:
    """A change that was not applied, and why."""

    change: Change
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.change.to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class AppliedFix:
    """What applying a diagnosis gave.

    Attributes:
        lora_config: a copy of the ``LoraConfig`` passed in, with its changes (None if none given).
        training_args: a copy of the ``TrainingArguments`` passed in, with its changes.
        changes: every change to make, merged: each field once, routed to its object.
        applied: those of ``changes`` set on a copy (a change for an object not given is in
            ``changes`` only: set it yourself).
        dropped: changes not taken: a finding ranked before sets the same field to another
            value, or the finding is information only.
        unrouted: changes not applied because no object has the field, the value has the wrong
            type, or the class refused it (with its reason).
        steps: what to do besides the configuration, in order.
        restart_from_scratch: True when a finding followed says the fix needs a new run from the
            base model (a new rank or new target modules change the adapter's shapes).
    """

    lora_config: Any
    training_args: Any
    changes: tuple[Change, ...] = ()
    applied: tuple[Change, ...] = ()
    dropped: tuple[Skipped, ...] = ()
    unrouted: tuple[Skipped, ...] = ()
    steps: tuple[str, ...] = ()
    restart_from_scratch: bool = False

    def config_changes(self) -> dict[str, dict[str, Any]]:
        """The changes by object: ``{"LoraConfig": {...}, "TrainingArguments": {...}}`` (an
        object with no change is left out)."""
        out: dict[str, dict[str, Any]] = {}
        for c in self.changes:
            out.setdefault(c.target, {})[c.field] = c.value
        return out

    def summary(self) -> str:
        """The fix in a few lines: the changes with the finding behind each, what was dropped or
        could not be applied and why, then the other steps.

        Example:
            >>> print(AppliedFix(None, None).summary())
            lora-doctor fix: no configuration change.
        """
        given = {LORA_CONFIG: self.lora_config, TRAINING_ARGUMENTS: self.training_args}
        if self.changes:
            head = f"lora-doctor fix: {len(self.changes)} configuration change(s)"
            head += ", then restart from step 0" if self.restart_from_scratch else ""
        else:
            head = "lora-doctor fix: no configuration change"
        lines = [head + ("." if not self.changes else ":")]
        for c in self.changes:
            note = "" if given[c.target] is not None else f" (no {c.target} given: set it yourself)"
            lines.append(f"  {c.target}.{c.assignment()}  [{c.code} {c.slug}]{note}")
        for title, skipped in (("Dropped", self.dropped), ("Not applied", self.unrouted)):
            if skipped:
                lines.append(f"{title}:")
                lines += [
                    f"  {s.change.assignment()} [{s.change.code} {s.change.slug}]: {s.reason}"
                    for s in skipped
                ]
        if self.steps:
            lines.append("Also:")
            lines += [f"  {i}. {step}" for i, step in enumerate(self.steps, 1)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The fix as strict-JSON data (what ``lora-doctor diagnose --fix-json`` writes)."""
        return {
            "schema_version": FIX_SCHEMA_VERSION,
            "tool": {"name": "lora-doctor", "version": __version__},
            "config_changes": to_jsonable(self.config_changes()),
            "restart_from_scratch": self.restart_from_scratch,
            "steps": list(self.steps),
            "changes": [c.to_dict() for c in self.changes],
            "dropped": [s.to_dict() for s in self.dropped],
            "unrouted": [s.to_dict() for s in self.unrouted],
        }


def _class_fields(obj: Any) -> dict[str, Any]:
    """The init fields of a dataclass instance's class, by name, with their resolved
    annotations (``Any`` where the annotations cannot be resolved)."""
    cls = type(obj)
    if cls not in _FIELDS:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation naming something not importable here: types unknown
            hints = {}
        _FIELDS[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    return _FIELDS[cls]


_FIELDS: dict[type, dict[str, Any]] = {}


#: Fields transformers renamed, old name -> new name. transformers 5 keeps
#: ``gradient_checkpointing*`` as mirrors of ``activation_checkpointing*``: the old name set on a
#: copy is silently reset from the new one. A change naming either is set under the new name when
#: the class has it, else under the old one.
RENAMED = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
_OLD_NAMES = {new: old for old, new in RENAMED.items()}


def _name_in(key: str, fields: Mapping[str, Any]) -> str:
    """The name ``key`` has in a class with ``fields``: the new one of a renamed field when the
    class has it, else the old one, else ``key``."""
    new = RENAMED.get(key, key)
    old = _OLD_NAMES.get(new, key)
    return new if new in fields else old if old in fields else key


def _route(key: str, value: Any, objects: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """The object ``key`` belongs to, the field's name there, and why it cannot be set there
    (None when it can)."""
    fields = {name: _class_fields(obj) for name, obj in objects.items() if obj is not None}
    known = KNOWN_FIELDS.get(key)
    owners = [name for name, f in fields.items() if _name_in(key, f) in f]
    if known is not None and (known[0] in owners or known[0] not in fields or not owners):
        target = known[0]
    elif owners:
        target = owners[0]
    else:
        return "", key, f"no field of {' or '.join(objects)}"
    if target not in fields:  # the object is not given: the doctor's own table decides
        hint = known[1] if known else Any
    else:
        key = _name_in(key, fields[target])
        if key not in fields[target]:
            return target, key, f"no field of this {type(objects[target]).__name__}"
        hint = fields[target][key]
    if not fits(value, hint):
        return target, key, f"{type(value).__name__} where {target} wants {_hint_name(hint)}"
    return target, key, None


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _top_cause(finding: Finding) -> str | None:
    """The most likely cause the diagnosis pass named for ``finding`` (``evidence.causes``' first,
    when supported), or None."""
    causes = finding.evidence.get("causes")
    first = causes[0] if isinstance(causes, list) and causes else None
    if isinstance(first, dict) and first.get("verdict") == "supported":
        return str(first.get("cause"))
    return None


def _ranked(findings: Iterable[Finding]) -> list[tuple[Finding, Recommendation]]:
    """The findings with a recommendation, errors first; within a severity, those judged on the
    run (with a step) before set-up findings, then in the order found. A finding judged on the
    run whose most likely cause is a set-up finding (a loss at chance caused by the
    ``learning-rate-too-high`` found before training) ranks with that finding's severity when it
    is higher: the same fault, seen with more of the run."""
    with_fix = [(f, f.recommendation) for f in findings if f.recommendation is not None]
    set_up = {f.slug: f.severity.rank for f in findings if f.step is None}

    def rank(f: Finding) -> int:  # a suggestion (information) is never lifted above the fixes
        lifted = f.step is not None and f.severity >= Severity.WARNING
        cause = _top_cause(f) if lifted else None
        return max(f.severity.rank, set_up.get(cause, 0) if cause else 0)

    return sorted(with_fix, key=lambda pair: (-rank(pair[0]), pair[0].step is None))


def _is_config_step(step: str, fields: Iterable[str]) -> bool:
    """A step that sets a field this fix sets ("Set lora_alpha=32 in LoraConfig"): the doctor's
    steps that start with "Set " name the arguments to change."""
    return step.startswith("Set ") and any(re.search(rf"\b{f}\b", step) for f in fields)


def _copy(obj: Any, changes: Sequence[Change]) -> tuple[Any, str | None]:
    """``obj`` with ``changes`` set through its class (validated), or ``obj`` and the refusal."""
    try:
        return dataclasses.replace(obj, **{c.field: c.value for c in changes}), None
    except Exception as err:  # the class's own validation: any exception type, one line kept
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return obj, f"{type(obj).__name__} refused it: {type(err).__name__}: {first}"[:300]


#: A field a finding measures on the run's trajectory, valid at its learning rate only.
_RATE_BOUND = "max_steps"

#: Why an information finding's change is not applied.
_SUGGESTION = (
    "information only: a suggestion, not a fix (apply with suggestions=True, or --suggestions)"
)


def suggestions_named(
    suggestions: bool | str | Collection[str] | None,
    findings: Sequence[Finding],
    field: str = "apply(suggestions=...)",
) -> bool | frozenset[str]:
    """``suggestions`` as :func:`apply_findings` follows them: a bool, or the names (slugs or
    codes) to follow; one string is one name, not its letters.

    Args:
        suggestions: True, False (None), a name, or a collection of names.
        findings: the diagnosis's findings: their slugs and codes are known names too (a user's
            own check).
        field: how the option is called in the messages (``"--suggest"`` on the command line).

    Raises:
        ValueError: a name that no check and no finding has (with a did-you-mean).
        TypeError: any other type (bytes included).
    """
    if suggestions is None or isinstance(suggestions, bool):
        return bool(suggestions)
    if isinstance(suggestions, bytes) or not isinstance(suggestions, str | Collection):
        raise TypeError(
            f"{field} takes True or False, a finding's slug, or a collection of slugs, got "
            f"{suggestions!r:.80}"
        )
    names = frozenset({suggestions} if isinstance(suggestions, str) else map(str, suggestions))
    unknown = names - {name for f in findings for name in (f.slug, f.code)}
    if unknown:
        from lora_doctor.checks import Registry  # the check catalogue, only when it is needed

        Registry().validate(field, unknown)
    return names


def _merge(
    findings: Iterable[Finding],
    objects: Mapping[str, Any],
    suggestions: bool | frozenset[str] = False,
) -> tuple[
    dict[str, Change], list[Skipped], list[Skipped], list[tuple[Recommendation, list[Change]]]
]:
    """The changes to make by field, those dropped and unrouted, and the findings followed with
    the changes each brings, by the rules of the module docstring."""
    chosen: dict[str, Change] = {}
    dropped: list[Skipped] = []
    unrouted: list[Skipped] = []
    followed: list[tuple[Recommendation, list[Change]]] = []
    for f, rec in _ranked(findings):
        routed: list[Change] = []
        for key, value in rec.config_changes.items():
            target, name, problem = _route(str(key), value, objects)
            change = Change(target, name, value, f.code, f.slug, f.severity)
            if problem is None:
                routed.append(change)
            else:
                unrouted.append(Skipped(change, problem))
        follow = suggestions is True or (
            not isinstance(suggestions, bool) and bool({f.slug, f.code} & suggestions)
        )
        if f.severity < Severity.WARNING and not follow:
            dropped += [Skipped(c, _SUGGESTION) for c in routed]
            continue
        clash = next(
            (c for c in routed if c.field in chosen and chosen[c.field].value != c.value), None
        )
        if clash is not None:
            winner = chosen[clash.field]
            reason = (
                f"{winner.code} {winner.slug} ({winner.severity.value}) sets "
                f"{winner.assignment()}; this finding's changes go together"
            )
            dropped += [Skipped(c, reason) for c in routed]
            continue
        new = [c for c in routed if c.field not in chosen]
        chosen.update((c.field, c) for c in new)
        followed.append((rec, new))
    steps, rate = chosen.get(_RATE_BOUND), chosen.get("learning_rate")
    if steps is not None and rate is not None and steps.slug != rate.slug:
        del chosen[_RATE_BOUND]
        dropped.append(
            Skipped(
                steps,
                f"measured at this run's learning rate; {rate.code} {rate.slug} sets "
                f"{rate.assignment()}, at which the run reaches that point at another step",
            )
        )
        followed = [(r, [c for c in new if c is not steps]) for r, new in followed]
    return chosen, dropped, unrouted, followed


def _set(obj: Any, changes: Sequence[Change]) -> tuple[Any, list[Change], list[Skipped]]:
    """``obj`` with ``changes`` set through its class; the changes it holds afterwards, and
    those it refused or did not keep, with why (then ``obj`` keeps the changes it did keep)."""
    copy, refused = _copy(obj, changes)
    if refused is not None:
        return obj, [], [Skipped(c, refused) for c in changes]
    lost = [
        Skipped(c, f"{type(obj).__name__} did not keep it: it reads {now!r} after the copy")
        for c in changes
        if not _kept(now := getattr(copy, c.field, None), c.value)
    ]
    return copy, [c for c in changes if all(c is not s.change for s in lost)], lost


def _kept(got: Any, value: Any) -> bool:
    """Whether a field read back after the copy holds ``value`` (a class may store a list as a
    set, a name as its enum member)."""
    if got == value:
        return True
    return (
        isinstance(got, set | frozenset)
        and isinstance(value, list | tuple)
        and (set(got) == set(value))
    )


def apply_findings(
    findings: Iterable[Finding],
    lora_config: Any = None,
    training_args: Any = None,
    *,
    suggestions: bool | str | Collection[str] = False,
) -> AppliedFix:
    """Applies the recommendations of ``findings`` to copies of ``lora_config`` and
    ``training_args`` by the rules of this module's docstring.

    Args:
        findings: a diagnosis's findings, in the order found.
        lora_config: the run's ``peft.LoraConfig`` (any dataclass), or None.
        training_args: the run's ``TrainingArguments`` (any dataclass, e.g. TRL's ``SFTConfig``),
            or None.
        suggestions: apply the information findings' changes too (after the others): True for
            all of them, or the slugs (or codes) of those to follow: ``{"attention-only-targets"}``
            or one name as a string.

    Returns:
        The copies, the changes applied, dropped and unrouted, and the other steps.

    Raises:
        TypeError: when an object given is not a dataclass instance.
        ValueError: a name in ``suggestions`` that is neither a check's nor a finding's.
        TypeError: ``suggestions`` of another type than those above.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Lora:
        ...     r: int = 16
        ...     lora_alpha: int = 8
        >>> from lora_doctor.findings import Recommendation
        >>> fix = Recommendation("Set lora_alpha=32", (), {"lora_alpha": 32})
        >>> ratio = Finding("LD110", "alpha-rank-ratio", Severity.WARNING, None, "t", "m", {}, fix)
        >>> apply_findings([ratio], Lora()).lora_config
        Lora(r=16, lora_alpha=32)
    """
    objects = {LORA_CONFIG: lora_config, TRAINING_ARGUMENTS: training_args}
    for name, obj in objects.items():
        if obj is not None and (not dataclasses.is_dataclass(obj) or isinstance(obj, type)):
            raise TypeError(
                f"{name} must be a dataclass instance such as peft's LoraConfig or "
                f"transformers' TrainingArguments, got {type(obj).__name__}"
            )
    findings = list(findings)
    chosen, dropped, unrouted, followed = _merge(
        findings, objects, suggestions_named(suggestions, findings)
    )
    copies = {k: None if v is None else _copy(v, ())[0] for k, v in objects.items()}
    applied: list[Change] = []
    for _, new in followed:
        for target, obj in objects.items():
            mine = [c for c in new if c.target == target]
            if not mine or obj is None:
                continue
            copies[target], kept, skipped = _set(copies[target], mine)
            applied += kept
            unrouted += skipped
            for s in skipped:
                del chosen[s.change.field]
    # a step that names a field dropped for the new learning rate ("max_steps=40") is stale too
    stale = [f"{s.change.field}=" for s in dropped if s.change.field == _RATE_BOUND]
    steps = [
        step
        for rec, _ in followed
        for step in rec.steps
        if not _is_config_step(step, chosen) and not any(name in step for name in stale)
    ]
    return AppliedFix(
        lora_config=copies[LORA_CONFIG],
        training_args=copies[TRAINING_ARGUMENTS],
        changes=tuple(chosen.values()),
        applied=tuple(applied),
        dropped=tuple(dropped),
        unrouted=tuple(unrouted),
        steps=tuple(dict.fromkeys(steps)),
        restart_from_scratch=any(rec.restart_from_scratch for rec, _ in followed),
    )
