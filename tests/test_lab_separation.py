"""A deployment runs coordinator/ without the lab: no coordinator module imports lab/ (datasets, emulated fleets,
the demo) when it is imported, and `coordinator run --help` does not reach it either. Only the lab's own commands
(`coordinator demo`, `assign`, `split`) import it, inside the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import coordinator

PROBE = """
import importlib, pkgutil, sys
import coordinator.engine, coordinator.cli, coordinator.runner
first = sorted(m for m in sys.modules if m.split(".")[0] == "lab")
modules = [m.name for m in pkgutil.walk_packages(coordinator.__path__, "coordinator.")]
for name in modules:
    importlib.import_module(name)
from typer.testing import CliRunner
result = CliRunner().invoke(coordinator.cli.app, ["run", "--help"])
assert result.exit_code == 0, result.output
after = sorted(m for m in sys.modules if m.split(".")[0] == "lab")
import lab.demo  # the probe sees the lab when it is loaded: the empty lists above are not vacuous
print(first, after, "lab.demo" in sys.modules, len(modules))
"""


def test_coordinator_modules_do_not_import_the_lab() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            cwd=Path(coordinator.__file__).parent.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first, after, seen, count = result.stdout.split()
    assert (first, after, seen) == ("[]", "[]", "True"), result.stdout  # no lab module before `import lab.demo`
    assert int(count) >= 15  # the walk really visited the package


def test_no_coordinator_source_file_imports_the_lab_at_module_level() -> None:
    offenders = []
    for path in Path(coordinator.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if not line.startswith((" ", "\t")) and len(words) >= 2 and words[0] in ("import", "from") \
                    and words[1].split(".")[0] == "lab":
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders
