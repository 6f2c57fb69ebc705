"""Times the offline doctor on a 100,000-entry log (target: under 1 s).

Builds a synthetic ``trainer_state.json`` (a training log every step with loss, grad_norm and
learning_rate, an evaluation every 1,000 steps), writes it, then times ``lora_doctor.diagnose`` on the
file (JSON parsing included), best of ``--repeat`` runs.

    python benchmarks/big_log.py [--entries 100000] [--repeat 3]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
