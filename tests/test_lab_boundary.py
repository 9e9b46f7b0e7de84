"""The deployment path never loads the lab: coordinator/ is what a real fleet runs, lab/ is the emulation."""

from __future__ import annotations

import subprocess
import sys

DEPLOYMENT_MODULES = ("coordinator.cli", "coordinator.engine", "coordinator.runner", "coordinator.run_report",
                      "coordinator.provision", "coordinator.model_export", "edge_agent.cli")


def test_importing_the_deployment_path_loads_no_lab_module() -> None:
    probe = (f"import importlib, sys\nfor name in {DEPLOYMENT_MODULES!r}:\n    importlib.import_module(name)\n"
             "print(sorted(m for m in sys.modules if m == 'lab' or m.startswith('lab.')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]", result.stdout

