"""The lab: packaged datasets, fleet emulation, the demo, and splitting a user's data for a trial fleet.

Why a package of its own: coordinator/ is what a real deployment runs (provision, broker, `coordinator run`,
report, export); nothing there imports this package at module level. The lab is what the README's `./run demo`,
`coordinator demo|plan|split`, the tests and the benchmarks use to stand up an emulated fleet on one machine;
the coordinator's CLI imports it only inside those commands.
"""
