"""The lab: packaged datasets, emulated fleets and the demo, kept apart from what a deployment runs.

``coordinator/`` is what a real deployment runs (`coordinator run`, `report`, `provision`, `broker`, `export`):
the engine, assignment, aggregation, store and run directory. Everything here exists to try the system on one
machine: the packaged datasets and their non-IID splits (``lab.datasets``), fleet files of emulated device classes
and the assignment they would get (``lab.fleet``), bring-your-own-data splits (``lab.user_data``), and the demo
that starts one `edge-agent join` process per emulated device (``lab.demo``). The README's `./run demo`, the
tests and the benchmarks use it; the `coordinator demo`, `assign` and `split` commands import it only when they
run, so no coordinator module imports the lab at module level (tests/test_lab_separation.py enforces it).
"""
