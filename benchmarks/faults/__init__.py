"""The LoRA fault benchmark: real tiny training runs, healthy or with one mistake each.

Run ``python -m benchmarks.faults --seeds 3`` for the table (``--quick`` for a subset); see
BENCHMARKS.md for what each run does and how it is scored.
"""
