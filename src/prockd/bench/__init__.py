"""Benchmarks: ``prockd bench compare`` (methods x seeds x settings x students, the paper's Table-1
shape) and ``prockd bench speed`` (throughput and memory ratios, side by side in one run)."""
