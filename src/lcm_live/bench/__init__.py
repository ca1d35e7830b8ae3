"""Benchmarks: real architectures with random weights, the seed article's code path as the baseline.

``bench_engine`` (one-shot images: `lcm-live bench`), ``bench_live`` (the studio's sustained fps:
`lcm-live bench --live`), ``measure`` (timers, memory, statistics)."""
