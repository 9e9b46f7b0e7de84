"""Benchmarks that measure what HeteroTune Edge costs beyond the training itself (issue 7).

`python -m bench.performance` runs every part and regenerates docs/performance.md; each part can also run
on its own (`python -m bench.performance --only scale --quick`). Everything stays on 127.0.0.1, every
loop is bounded in count and time, and every process a benchmark starts is stopped by its PID.
"""
