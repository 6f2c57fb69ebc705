"""DoctorConfig: every threshold the checks use, with its default, help text and validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

__all__ = ["DoctorConfig"]

_Check = Callable[[Any], bool]


def _opt(default: Any, help: str, check: _Check | None = None, rule: str = "") -> Any:
    """A config field: its default, the help string, and the constraint a value must meet."""
    meta = {"help": help, "check": check, "rule": rule}
    if isinstance(default, (set, frozenset, dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _fraction(v: Any) -> bool:
    return _non_negative(v) and v <= 1


def _open_fraction(v: Any) -> bool:
    return _fraction(v) and 0 < v < 1


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class DoctorConfig:
    """Thresholds and switches of every check.

    Every field has a default that suits most runs; change one by name. Invalid values raise a
    ``ValueError`` that names the field, the rule and the value received.

    Example:
        >>> cfg = DoctorConfig(ignore={"alpha-rank-ratio"}, check_after_steps=5)
        >>> cfg.check_after_steps
        5
    """

    # --- switches -------------------------------------------------------------------------------
    ignore: frozenset[str] = _opt(
        frozenset(), "Finding slugs (or codes) never to report, e.g. {'alpha-rank-ratio'}."
    )
    stop_on: frozenset[str] = _opt(
        frozenset(),
        "Finding slugs (or codes) that stop training when found (sets control.should_training_stop).",
    )
    check_after_steps: int = _opt(
        2,
        "Optimizer steps after which the post-step adapter checks run (gradients, B moved, shapes).",
        _positive_int,
        "an integer >= 1",
    )
    print_metrics: bool = _opt(
        False,
        "Also print the doctor's lora_doctor/... metrics in the log lines the Trainer prints "
        "(progress bar, PrinterCallback). By default they go to the trackers (TensorBoard, W&B "
        "...) and the diagnosis only, and the printed lines look as they do without the doctor.",
        lambda v: isinstance(v, bool),
        "True or False",
    )

    alerts: bool = _opt(
        False,
        "Also send each warning or error finding, once, as an alert to the tracker the run "
        "reports to, when it has an alert API and an active run: W&B's run.alert (its Slack or "
        "e-mail alerts, at level WARN or ERROR). Trackers without an alert API get the "
        "lora_doctor/... metrics only.",
        lambda v: isinstance(v, bool),
        "True or False",
    )

    # --- adapter ----------------------------------------------------------------------------------
    scaling_low: float = _opt(
        1.0,
        "Lowest effective scaling (alpha/r, or alpha/sqrt(r) under rsLoRA) that passes: alpha = r.",
        _positive,
        "a number > 0",
    )
    scaling_high: float = _opt(
        2.0,
        "Highest effective scaling that passes: alpha = 2r.",
        _positive,
        "a number > 0",
    )
    scaling_tolerance: float = _opt(
        0.05,
        "Relative slack around [scaling_low, scaling_high] before alpha-rank-ratio fires.",
        _non_negative,
        "a number >= 0",
    )
    budget_low: float = _opt(
        0.0005,
        "Smallest share of the base model's parameters that LoRA parameters should make (0.05%).",
        _fraction,
        "a number in [0, 1]",
    )
    budget_high: float = _opt(
        0.01,
        "Largest share of the base model's parameters that LoRA parameters should make (1%).",
        _fraction,
        "a number in [0, 1]",
    )
    budget_warn_factor: float = _opt(
        2.0,
        "lora-param-budget is a warning only when the share is this many times beyond the range "
        "(below budget_low / factor or above budget_high * factor); nearer, it is info.",
        lambda v: _positive(v) and v >= 1,
        "a number >= 1",
    )
    budget_min_base_params: int = _opt(
        100_000_000,
        "Base models smaller than this get lora-param-budget as info only: the 0.05% to 1% rule "
        "comes from 1B to 70B models, and a tiny model's adapter is necessarily a large share.",
        _non_negative_int,
        "an integer >= 0",
    )

    # --- learning rate, update size, rewards --------------------------------------------------------
    lr_high_warning: float = _opt(
        10.0,
        "learning-rate-too-high is a warning, and the learning rate a supported cause of a "
        "plateau, divergence, spike or NaN, at this many times the top of LoRA's usual range for "
        "the optimizer and model width (AdamW at hidden size 4096: 1e-3, so 1e-2); above the top "
        "but below this, information.",
        lambda v: _positive(v) and v >= 1,
        "a number >= 1",
    )
    lr_high_error: float = _opt(
        100.0,
        "learning-rate-too-high is an error at this many times the top of LoRA's usual range "
        "(AdamW at hidden size 4096: 0.1): each step then moves every weight by more than its own "
        "size.",
        lambda v: _positive(v) and v >= 1,
        "a number >= 1",
    )
    lr_fix_min_fall: float = _opt(
        0.1,
        "Share of its first logged value the training loss must have fallen by, at its best, for "
        "the learning-rate fix to follow the run's own rate there (half of it, capped at the top "
        "of LoRA's range); a smaller fall is noise, and the fix sets the optimizer's usual rate.",
        _fraction,
        "a number in [0, 1]",
    )
    update_too_large: float = _opt(
        2.0,
        "update-too-large fires when the median over the LoRA layers of ||scaling * B @ A||_F / "
        "||W||_F reaches this: the learned update outweighs the frozen weight it should adjust.",
        _positive,
        "a number > 0",
    )
    reward_tied_steps: int = _opt(
        3,
        "Logged steps of an RL run with no reward variance (frac_reward_zero_std = 1 or "
        "reward_std = 0: a zero gradient by design) before no-reward-variance is reported.",
        _positive_int,
        "an integer >= 1",
    )

    # --- multigpu / ecosystem -----------------------------------------------------------------------
    rl_min_rank: int = _opt(
        64,
        "Rank below which an online RL (GRPO) adapter gets the rl-low-rank information.",
        _positive_int,
        "an integer >= 1",
    )
    vllm_max_lora_rank: int | None = _opt(
        None,
        "max_lora_rank of a vLLM server the run generates with, when the doctor cannot read it "
        "(vllm serve --max-lora-rank); None: read it from the engine or the training arguments.",
        lambda v: v is None or _positive_int(v),
        "None or an integer >= 1",
    )

    # --- memory -----------------------------------------------------------------------------------
    oom_peak_share: float = _opt(
        0.90,
        "Share of the device's capacity that peak memory (PyTorch's peak allocated plus what is "
        "held outside PyTorch: CUDA context, other processes) may reach before oom-risk fires.",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    oom_retry_intervals: int = _opt(
        3,
        "Logging intervals, among the last oom_retry_window, in which the CUDA allocator's retry "
        "count (num_alloc_retries) rose before oom-risk fires.",
        _positive_int,
        "an integer >= 1",
    )
    oom_retry_window: int = _opt(
        5,
        "Logging intervals looked back over for rising allocator retries.",
        _positive_int,
        "an integer >= 1",
    )
    oom_growth_min_readings: int = _opt(
        5,
        "Memory readings (the first one, which holds the warm-up, left out) needed before the "
        "growth of the memory held between steps is extrapolated to max_steps.",
        lambda v: _positive_int(v) and v >= 3,
        "an integer >= 3",
    )
    oom_growth_window: int = _opt(
        50,
        "Most recent memory readings the growth fit uses (bounds its cost on long runs).",
        lambda v: _positive_int(v) and v >= 3,
        "an integer >= 3",
    )
    oom_growth_confidence: float = _opt(
        0.95,
        "Confidence of the Theil-Sen slope interval: the growth rule fires only when the whole "
        "interval is above zero (noise in the held memory never extrapolates).",
        _open_fraction,
        "a number in (0, 1)",
    )
    # --- cost -------------------------------------------------------------------------------------
    time_budget: float | None = _opt(
        0.005,
        "Largest share of the training's wall time the doctor may spend in all (its hooks, the "
        "start-up walk of the model, the first-steps checks and the spectrum readings), measured "
        "live: the spectrum readings take what the rest leaves, with fewer readings or fewer "
        "layers per reading when steps are short. None: no limit (every planned reading, in full).",
        lambda v: v is None or (_fraction(v) and v > 0),
        "None or a number in (0, 1]",
    )

    # --- rank: spectrum of the learned update, capacity against data ---------------------------
    spectrum: bool = _opt(
        True,
        "Read the singular values of every layer's learned update scaling * B @ A periodically "
        "(rank-saturated, rank-underused). False switches the spectrum probe off.",
        lambda v: isinstance(v, bool),
        "True or False",
    )
    spectrum_every_steps: int = _opt(
        0,
        "Optimizer steps between spectrum readings; 0 reads about every spectrum_every_fraction "
        "of max_steps. A reading is also taken at the end of training.",
        _non_negative_int,
        "an integer >= 0",
    )
    spectrum_every_fraction: float = _opt(
        0.1,
        "Share of max_steps between spectrum readings when spectrum_every_steps is 0.",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    spectrum_min_layers: int = _opt(
        16,
        "Fewest layers a spectrum reading reads (every layer when the model has fewer): a planned "
        "reading the time budget cannot fit with this many is skipped, and the rank verdicts need "
        "this many layers in the latest reading.",
        _positive_int,
        "an integer >= 1",
    )
    rank_noise_floor: float = _opt(
        0.1,
        "Singular values below this fraction of a layer's largest count as unused (noise floor).",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    rank_full_ratio: float = _opt(
        0.25,
        "A layer fills its rank when its smallest singular value is at least this fraction of its "
        "largest (no value near zero, no cliff).",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    rank_underused_fraction: float = _opt(
        0.5,
        "A layer underuses its rank when at most this fraction of its r singular values stand "
        "above the noise floor (0.5: r could be halved).",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    rank_layer_share: float = _opt(
        0.6,
        "Share of the LoRA layers that must fill (or underuse) their rank for rank-saturated "
        "(rank-underused) to fire.",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    rank_min_progress: float = _opt(
        0.3,
        "Share of max_steps (or of the run, offline) done before the rank verdicts: the early "
        "spectrum still holds the random start.",
        _fraction,
        "a number in [0, 1]",
    )
    rank_min_update: float = _opt(
        1e-4,
        "Median ||scaling * B @ A||_F / ||W||_F below which the adapter has barely moved and its "
        "spectrum says nothing.",
        _non_negative,
        "a number >= 0",
    )
    rank_min_growth: float = _opt(
        1.1,
        "Factor by which the learned update's median size must have grown since the first "
        "spectrum reading before the rank verdicts: an update that has not grown since then is "
        "stuck where it started (a learning rate of 0, frozen layers), and its spectrum says "
        "nothing about the rank. Lenient on purpose: a fast update is most of its final size at "
        "the first reading (planted-rank benchmark, r = 32: 1.1x by 30% of training).",
        lambda v: _positive(v) and v >= 1,
        "a number >= 1",
    )
    rank_stall_window: float = _opt(
        0.25,
        "Share of the steps so far over which the training loss must have stopped improving for "
        "rank-saturated to call the rank binding.",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    rank_stall_improvement: float = _opt(
        0.1,
        "Relative improvement of the median training loss between the last two windows below "
        "which the loss counts as stalled.",
        _fraction,
        "a number in [0, 1]",
    )
    capacity_bits_per_param: float = _opt(
        2.0,
        "Bits of information a trained parameter holds (Allen-Zhu & Li 2024: about 2).",
        _positive,
        "a number > 0",
    )
    data_bits_per_token: float = _opt(
        1.0,
        "Assumed bits of new information per supervised token (an order-of-magnitude guess: the "
        "base model already predicts most of each token).",
        _positive,
        "a number > 0",
    )
    capacity_margin: float = _opt(
        2.0,
        "data-exceeds-capacity fires when the data's estimated bits exceed the adapter's capacity "
        "by this factor.",
        lambda v: _positive(v) and v >= 1,
        "a number >= 1",
    )
    token_count_sample: int = _opt(
        2000,
        "Examples read to count the supervised tokens; larger sets are sampled and extrapolated.",
        _positive_int,
        "an integer >= 1",
    )

    # --- curves -----------------------------------------------------------------------------------
    plateau_early_fraction: float = _opt(
        0.1,
        "Share of training treated as the early phase (fast initial fall) before plateau windows start.",
        _fraction,
        "a number in [0, 1]",
    )
    plateau_latest_start: float = _opt(
        0.3,
        "Latest start of a plateau window, as a share of training: a loss that only flattens later "
        "has converged.",
        _fraction,
        "a number in [0, 1]",
    )
    plateau_start_stride: float = _opt(
        0.05,
        "Spacing of the plateau window starts, as a share of training. At least 0.01: each start "
        "is a Theil-Sen fit, so this keeps them to 100 or fewer per look (a stride too small to "
        "move the start would never end).",
        lambda v: _positive(v) and v >= 0.01,
        "a number >= 0.01",
    )
    plateau_min_span: float = _opt(
        0.1,
        "Shortest plateau window, as a share of training (a plateau from 10% is reported at 20%).",
        _fraction,
        "a number in [0, 1]",
    )
    plateau_min_points: int = _opt(
        8, "Fewest loss logs in a plateau window.", _positive_int, "an integer >= 1"
    )
    plateau_max_gain: float = _opt(
        0.01,
        "Plateau when the Theil-Sen loss improvement per 10% of training, relative to the loss, is below this.",
        _non_negative,
        "a number >= 0",
    )
    plateau_max_gain_bound: float = _opt(
        0.02,
        "... and the steepest improvement within the confidence interval is below this.",
        _non_negative,
        "a number >= 0",
    )
    plateau_confidence: float = _opt(
        0.95,
        "Confidence level of the Theil-Sen slope interval (Sen's interval from Kendall's tau).",
        _open_fraction,
        "a number in (0, 1)",
    )
    plateau_converged_drop: float = _opt(
        0.9,
        "A loss already down by this share of its first logged value has converged: no plateau.",
        _fraction,
        "a number in [0, 1]",
    )
    plateau_look_growth: float = _opt(
        0.25,
        "The plateau statistics run again once the step has grown by this share (0.25: at 20%, "
        "25%, 31%, 39% ... of training): few looks, few chances for noise to pass as a plateau.",
        _positive,
        "a number > 0",
    )
    plateau_max_points: int = _opt(
        100,
        "Loss logs beyond this are binned (medians) before the Theil-Sen fit.",
        lambda v: _positive_int(v) and v >= 8,
        "an integer >= 8",
    )
    plateau_low_lr: float = _opt(
        5e-5,
        "A learning rate below this is named as a plateau cause (LoRA usually needs 1e-4 to 5e-4).",
        _positive,
        "a number > 0",
    )
    overfit_patience: int = _opt(
        3,
        "Evaluations in a row above the best eval loss before overfit is reported.",
        _positive_int,
        "an integer >= 1",
    )
    overfit_min_rise: float = _opt(
        0.05,
        "Relative rise of the eval loss above its best that counts (5%).",
        _non_negative,
        "a number >= 0",
    )
    overfit_min_abs_rise: float = _opt(
        0.01,
        "Absolute rise of the eval loss above its best that counts (tiny, flat losses are not overfitting).",
        _non_negative,
        "a number >= 0",
    )
    overfit_trend_min_rise: float = _opt(
        0.02,
        "Relative rise of the eval loss above its best that counts when the evaluations since the "
        "best rise steadily (a Theil-Sen slope whose whole interval is above zero).",
        _non_negative,
        "a number >= 0",
    )
    overfit_trend_confidence: float = _opt(
        0.99,
        "Confidence of the Theil-Sen slope interval of the evaluations since the best (Sen's "
        "interval from Kendall's tau; at 0.99 it needs at least 6 of them).",
        _open_fraction,
        "a number in (0, 1)",
    )
    overfit_small_dataset: int = _opt(
        1000,
        "Training sets smaller than this get weight decay in the overfit fix.",
        _positive_int,
        "an integer >= 1",
    )
    divergence_window: int = _opt(
        5,
        "Loss logs in the rolling median of loss-divergence, and how long the rise must last.",
        _positive_int,
        "an integer >= 1",
    )
    divergence_rise: float = _opt(
        0.5,
        "Divergence when the rolling median rises above its best by this share of the best ...",
        _positive,
        "a number > 0",
    )
    divergence_giveback: float = _opt(
        0.5,
        "... and gives back at least this share of the drop achieved before.",
        _non_negative,
        "a number >= 0",
    )
    divergence_noise: float = _opt(
        3.0,
        "... and rises above its best by more than this many noise standard deviations.",
        _non_negative,
        "a number >= 0",
    )
    divergence_early_factor: float = _opt(
        3.0,
        "A rolling median this many times the lowest median of the losses logged before the "
        "window first filled is a divergence too: a loss that jumps within the first logs and "
        "stays up has no rolling best from before the jump.",
        lambda v: _positive(v) and v > 1,
        "a number > 1",
    )
    spike_factor: float = _opt(
        10.0,
        "A grad norm this many times the median of the previous ones is a spike.",
        lambda v: _positive(v) and v > 1,
        "a number > 1",
    )
    spike_window: int = _opt(
        20, "Previous grad norms in the spike median.", _positive_int, "an integer >= 1"
    )
    spike_min_points: int = _opt(
        10, "Grad norms needed before spikes are judged.", _positive_int, "an integer >= 1"
    )
    spike_early_factor: float = _opt(
        100.0,
        "A grad norm logged before spike_min_points others is judged against this many times "
        "the median of those before it: an extreme jump (11,140 among norms near 8) is a spike "
        "however early it comes.",
        lambda v: _positive(v) and v > 1,
        "a number > 1",
    )
    spike_early_min_points: int = _opt(
        3,
        "Grad norms needed before an early one is judged against spike_early_factor.",
        _positive_int,
        "an integer >= 1",
    )

    # --- nothing learned ---------------------------------------------------------------------------
    chance_tolerance: float = _opt(
        0.05,
        "loss-at-chance fires when the training loss after the early phase is at least "
        "(1 - chance_tolerance) * ln(vocab_size), the loss of a uniform guess over the vocabulary.",
        lambda v: _fraction(v) and v < 1,
        "a number in [0, 1)",
    )
    chance_max: float = _opt(
        1.5,
        "... and at most this many times ln(vocab_size): a larger loss is no mean token "
        "cross-entropy near chance (a summed loss, or a divergence).",
        lambda v: _positive(v) and v >= 1,
        "a number >= 1",
    )
    stuck_min_drop: float = _opt(
        0.05,
        "loss-at-chance also fires when the loss is flat (the loss-plateau rule) and has fallen by "
        "less than this share of its first logged value: nothing was learned at all.",
        _fraction,
        "a number in [0, 1]",
    )
    repeat_min_logs: int = _opt(
        6,
        "weights-not-updating fires when this many logged losses in a row equal, to 4 decimals, "
        "the loss logged one epoch earlier (and spread over at least 0.01).",
        lambda v: _positive_int(v) and v >= 2,
        "an integer >= 2",
    )
    not_updating_min_logs: int = _opt(
        5,
        "Logs with a learning rate of exactly 0 (all of them), or a grad norm of exactly 0 (at "
        "least half of them), before weights-not-updating fires.",
        _positive_int,
        "an integer >= 1",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("ignore", "stop_on"):
                object.__setattr__(self, f.name, _slug_set(f.name, value))
                continue
            check = f.metadata.get("check")
            if check is not None and not check(value):
                raise ValueError(
                    f"DoctorConfig.{f.name} must be {f.metadata['rule']}, got {value!r}"
                )
        both = sorted(self.stop_on & self.ignore)
        if both:
            raise ValueError(
                f"DoctorConfig.stop_on and ignore both name {both}: an ignored finding is never "
                "reported, so it could never stop training; remove it from one of them"
            )
        if self.scaling_low > self.scaling_high:
            raise ValueError(
                "DoctorConfig.scaling_low must be <= scaling_high, "
                f"got {self.scaling_low!r} > {self.scaling_high!r}"
            )
        if self.lr_high_warning > self.lr_high_error:
            raise ValueError(
                "DoctorConfig.lr_high_warning must be <= lr_high_error, "
                f"got {self.lr_high_warning!r} > {self.lr_high_error!r}"
            )
        if self.plateau_early_fraction > self.plateau_latest_start:
            raise ValueError(
                "DoctorConfig.plateau_early_fraction must be <= plateau_latest_start, "
                f"got {self.plateau_early_fraction!r} > {self.plateau_latest_start!r}"
            )
        if self.spike_early_factor < self.spike_factor:
            raise ValueError(
                "DoctorConfig.spike_early_factor must be >= spike_factor, "
                f"got {self.spike_early_factor!r} < {self.spike_factor!r}"
            )
        if self.budget_low > self.budget_high:
            raise ValueError(
                "DoctorConfig.budget_low must be <= budget_high, "
                f"got {self.budget_low!r} > {self.budget_high!r}"
            )
        if self.oom_growth_min_readings > self.oom_growth_window:
            raise ValueError(
                "DoctorConfig.oom_growth_min_readings must be <= oom_growth_window, "
                f"got {self.oom_growth_min_readings!r} > {self.oom_growth_window!r}"
            )
        if self.oom_retry_intervals > self.oom_retry_window:
            raise ValueError(
                "DoctorConfig.oom_retry_intervals must be <= oom_retry_window, "
                f"got {self.oom_retry_intervals!r} > {self.oom_retry_window!r}"
            )

    @classmethod
    def describe(cls) -> dict[str, tuple[Any, str]]:
        """Each field's default and help text, by name."""
        out: dict[str, tuple[Any, str]] = {}
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]
            out[f.name] = (default, f.metadata.get("help", ""))
        return out

    @classmethod
    def rules(cls) -> dict[str, str]:
        """Each field's rule for a valid value (``"a number > 0"``), by name; ``""`` for the fields
        that take any set of finding names (``ignore``, ``stop_on``).

        Example:
            >>> DoctorConfig.rules()["check_after_steps"]
            'an integer >= 1'
        """
        return {f.name: f.metadata.get("rule", "") for f in fields(cls)}

    def silenced(self, slug: str, code: str = "") -> bool:
        """True when the user asked never to report this finding."""
        return slug in self.ignore or (bool(code) and code in self.ignore)

    def stops(self, slug: str, code: str = "") -> bool:
        """True when a finding of this slug (or code) should stop training."""
        return slug in self.stop_on or (bool(code) and code in self.stop_on)


def _slug_set(name: str, value: Any) -> frozenset[str]:
    """A set of finding slugs or codes (one string is one name). Whether each name is known is
    checked by the :class:`~lora_doctor.engine.Doctor`, whose registry may hold a user's own checks.
    """
    if isinstance(value, str):
        value = {value}
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"DoctorConfig.{name} must be a set of finding slugs or codes, got {value!r}"
        )
    return frozenset(value)
