"""Benchmarks of lora-fast: layer and model-step tables (``python bench/run.py --help``)."""

__all__: list[str] = []
