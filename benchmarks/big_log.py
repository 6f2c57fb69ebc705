"""The offline doctor's speed and memory, as ratios measured side by side in one run.

Prints, each against its yardstick on the same machine at the same time:

1. **Start-up**: ``lora-doctor diagnose`` of a small run (a fresh process, importing included)
   against ``python -c "import json, numpy"`` (target: within 4x), in CPU seconds. Best of
   ``--repeat`` runs.
2. **A long log**: ``diagnose`` of a ``--entries`` log (losses, grad norms and learning rates every
   step, an evaluation every 100 steps; 1,000,000 by default) against ``json.load`` of the same
   file, in CPU seconds (target: within 10x, linear in the entries). Best of ``--repeat`` runs.
3. **Memory**: the peak memory ``diagnose`` allocates (file reading and parsing included), against
   ``json.load`` of the file (target: within 3x), each in a fresh process, by ``tracemalloc``.
4. **Overfit**: how judging overfit scales with the number of evaluations (10,000, 20,000 and
   40,000 by default: linear means a flat time per evaluation; the earlier check rescanned every
   evaluation at each one and took 4 s for 10,000, 64 s for 40,000).

    python benchmarks/big_log.py [--entries 1000000] [--repeat 3] [--evals 10000 20000 40000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lora_doctor.offline import diagnose

ROOT = Path(__file__).resolve().parents[1]

#: Runs in a fresh process: the peak of the memory Python and numpy allocate for ``body`` (bytes,
#: tracemalloc, which numpy reports its arrays to), what is imported before it left out.
_PEAK = """
import json, tracemalloc
from lora_doctor.offline import diagnose
tracemalloc.start()
{body}
print(tracemalloc.get_traced_memory()[1])
"""


def make_state(entries: int, seed: int = 0, eval_every: int = 100) -> dict:
    """A trainer state with ``entries`` log entries: a fast fall, then a slow noisy decline, and an
    evaluation every ``eval_every`` steps."""
    rng = np.random.default_rng(seed)
    steps = entries - entries // (eval_every + 1)
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
        if step % eval_every == 0:
            smooth = 1.1 + 1.5 * np.exp(-t[i] / 0.05) - 0.3 * t[i]
            log.append({"epoch": step / steps * 3, "eval_loss": float(smooth), "step": step})
    return {"global_step": steps, "max_steps": steps, "num_train_epochs": 3, "log_history": log}


def _best_cpu(cmd: list[str], repeat: int) -> float:
    """The best CPU time (user + system) of ``cmd`` over ``repeat`` runs, a fresh process each
    (CPU time, not wall: other work on the machine barely moves it)."""
    best = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=False, capture_output=True, cwd=ROOT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best = min(best, cpu)
    return best


def startup(small: Path, repeat: int) -> tuple[float, float]:
    """(diagnose of a small run, import of json and numpy), best CPU seconds each."""
    base = _best_cpu([sys.executable, "-c", "import json, numpy"], repeat)
    cmd = [sys.executable, "-m", "lora_doctor.cli", "diagnose", str(small), "--fail-on", "error"]
    return _best_cpu(cmd, repeat), base


def long_log(path: Path, repeat: int) -> tuple[float, float, set[str]]:
    """(diagnose, json.load) of ``path``: best CPU seconds each, and the findings."""
    parse = diag = float("inf")
    slugs: set[str] = set()
    for _ in range(repeat):
        cpu = time.process_time()
        with open(path, encoding="utf-8") as fh:
            json.load(fh)
        parse = min(parse, time.process_time() - cpu)
        cpu = time.process_time()
        slugs = diagnose(path).slugs
        diag = min(diag, time.process_time() - cpu)
    return diag, parse, slugs


def _peak_bytes(body: str) -> int:
    code = _PEAK.format(body=body)
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return int(done.stdout.split()[-1])


def memory(path: Path) -> tuple[int, int]:
    """(peak bytes of diagnose, peak bytes of json.load), each in a fresh process."""
    parsed = _peak_bytes(f"json.load(open({str(path)!r}))")
    diag = _peak_bytes(f"diagnose({str(path)!r})")
    return diag, parsed


def eval_scaling(sizes: list[int]) -> list[tuple[int, float]]:
    """CPU seconds to diagnose a log with ``n`` evaluations (and ``n`` training logs), for each ``n``.

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
        start = time.process_time()
        diagnose({"max_steps": n, "log_history": log})
        out.append((n, time.process_time() - start))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--evals", type=int, nargs="*", default=[10_000, 20_000, 40_000])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small", Path(tmp) / "big"
        small.mkdir()
        big.mkdir()
        (small / "trainer_state.json").write_text(json.dumps(make_state(200)))
        (big / "trainer_state.json").write_text(json.dumps(make_state(args.entries)))
        diag, base = startup(small, args.repeat)
        print(
            f"start-up: diagnose of a 200-entry run {diag:.3f} s CPU, python -c 'import json, "
            f"numpy' {base:.3f} s CPU: {diag / base:.1f}x (target <= 4x)"
        )
        diag, parse, slugs = long_log(big / "trainer_state.json", args.repeat)
        print(
            f"{args.entries:,} entries: diagnose {diag:.2f} s CPU, json.load {parse:.2f} s CPU: "
            f"{diag / parse:.1f}x (target <= 10x; findings: {', '.join(sorted(slugs)) or 'none'})"
        )
        peak, parsed = memory(big / "trainer_state.json")
        print(
            f"memory: diagnose peaks at {peak / 2**20:.0f} MiB, json.load at {parsed / 2**20:.0f} "
            f"MiB: {peak / parsed:.2f}x (target <= 3x)"
        )
    scaling = eval_scaling(args.evals)
    for n, seconds in scaling:
        print(f"{n:>7} evaluations: {seconds:.2f} s CPU, {1e6 * seconds / n:.0f} us per evaluation")
    if len(scaling) > 1:
        (n0, t0), (n1, t1) = scaling[0], scaling[-1]
        print(
            f"{n1 / n0:.0f}x the evaluations took {t1 / t0:.1f}x the time (linear: {n1 / n0:.0f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
