"""``python -m benchmarks.faults --seeds 3 [--quick] [--fix-loop] [--jobs N]``: the LoRA fault
benchmark."""

import sys

from benchmarks.faults.bench import main

if __name__ == "__main__":  # --jobs workers import this module: they must not run the benchmark
    sys.exit(main())
