"""The device never needs torch, transformers or onnx to train or predict: every edge_agent module imports and the
ORT backend loads with those three made unimportable, as on a real Raspberry Pi or Jetson install. (`edge-agent
export` alone reaches onnx, at run time, through edge_agent.inference_graph.load_onnx.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import edge_agent

BLOCKED = ("torch", "transformers", "onnx")

PROBE = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on this device")
        return None

sys.meta_path.insert(0, Block())
import edge_agent
modules = [m.name for m in pkgutil.walk_packages(edge_agent.__path__, "edge_agent.")]
for name in modules:
    importlib.import_module(name)
from edge_agent.ort_api import load_training_api
load_training_api()
from edge_agent.profile import available_backends
assert "ort" in available_backends(), available_backends()
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print(len(modules))
"""


def test_every_agent_module_imports_without_builder_libraries() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE.format(blocked=BLOCKED)], capture_output=True, text=True,
                            cwd=Path(edge_agent.__file__).parent.parent, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) >= 10  # the walk really visited the package


def test_no_agent_source_file_imports_builder_libraries_at_module_level() -> None:
    offenders = []
    for path in Path(edge_agent.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in BLOCKED:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders
