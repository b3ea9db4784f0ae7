"""genqueue benchmarks: throughput, capacity and poll efficiency, each against its baseline in the same run.

``python -m benchmarks [--quick] [--only NAME] [--out PATH]`` (``make bench``, ``make bench-quick``).
"""
