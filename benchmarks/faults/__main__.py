"""``python -m benchmarks.faults --seeds 3 [--quick] [--fix-loop]``: the LoRA fault benchmark."""

import sys

from benchmarks.faults.bench import main

sys.exit(main())
