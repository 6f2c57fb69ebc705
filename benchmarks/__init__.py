"""Benchmarks of lora-doctor: fault detection on real tiny training runs, and overhead on a GPU."""
