"""Cost, time and memory scripts; run them as modules (``python -m benchmarks.X``)."""
