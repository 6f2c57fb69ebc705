"""Times the offline doctor on a 100,000-entry log (target: under 1 s), and how judging overfit
scales with the number of evaluations (target: linear).

Builds a synthetic ``trainer_state.json`` (a training log every step with loss, grad_norm and
learning_rate, an evaluation every 1,000 steps), writes it, then times ``lora_doctor.diagnose`` on the
file (JSON parsing included), best of ``--repeat`` runs. Then replays logs with 10,000, 20,000 and
40,000 evaluations (one per training log) and prints the time per evaluation at each size: flat
when the cost is linear (the earlier overfit check rescanned every evaluation at each one: 4 s for
10,000, 64 s for 40,000).

    python benchmarks/big_log.py [--entries 100000] [--repeat 3] [--evals 10000 20000 40000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lora_doctor.offline import diagnose


def eval_scaling(sizes: list[int]) -> list[tuple[int, float]]:
    """Seconds to diagnose a log with ``n`` evaluations (and ``n`` training logs), for each ``n``.

    The eval loss falls, then rises slowly in small steps that never last ``overfit_patience``
    evaluations above the threshold, so every evaluation is judged and none ends the check.
    """
    out = []
    for n in sizes:
        i = np.arange(1, n + 1)
        evals = 1.0 + 0.5 / np.sqrt(i) + 0.002 * np.sin(i)
        log = []
        for k in range(n):
            log.append({"loss": 1.0 / (k + 1), "step": k + 1})
            log.append({"eval_loss": float(evals[k]), "step": k + 1})
        start = time.perf_counter()
        diagnose({"max_steps": n, "log_history": log})
        out.append((n, time.perf_counter() - start))
    return out


def make_state(entries: int, seed: int = 0) -> dict:
    """A trainer state with ``entries`` log entries: a fast fall, then a slow noisy decline."""
    rng = np.random.default_rng(seed)
    evals = entries // 1000
    steps = entries - evals
    t = np.arange(1, steps + 1) / steps
    loss = 1.0 + 1.5 * np.exp(-t / 0.05) - 0.3 * t + rng.normal(0, 0.05, steps)
    grad = np.abs(0.5 + rng.normal(0, 0.1, steps))
    log = []
    for i in range(steps):
        step = i + 1
        log.append(
            {
                "epoch": round(step / steps * 3, 4),
                "grad_norm": float(grad[i]),
                "learning_rate": 2e-4 * (1 - float(t[i])),
                "loss": round(float(loss[i]), 4),
                "step": step,
            }
        )
        if step % 1000 == 0:
            smooth = 1.1 + 1.5 * np.exp(-t[i] / 0.05) - 0.3 * t[i]
            log.append({"epoch": step / steps * 3, "eval_loss": float(smooth), "step": step})
    return {"global_step": steps, "max_steps": steps, "num_train_epochs": 3, "log_history": log}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--evals", type=int, nargs="*", default=[10_000, 20_000, 40_000])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainer_state.json"
        path.write_text(json.dumps(make_state(args.entries)))
        walls, cpus = [], []
        for _ in range(args.repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            diagnosis = diagnose(path)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    print(
        f"{args.entries} log entries, JSON parsing included: diagnose() best {min(walls):.3f} s "
        f"wall, {min(cpus):.3f} s CPU (best of {args.repeat}; findings: "
        f"{', '.join(sorted(diagnosis.slugs)) or 'none'})"
    )
    scaling = eval_scaling(args.evals)
    for n, seconds in scaling:
        print(f"{n:>7} evaluations: {seconds:.2f} s, {1e6 * seconds / n:.0f} us per evaluation")
    if len(scaling) > 1:
        (n0, t0), (n1, t1) = scaling[0], scaling[-1]
        print(
            f"{n1 / n0:.0f}x the evaluations took {t1 / t0:.1f}x the time (linear: {n1 / n0:.0f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
