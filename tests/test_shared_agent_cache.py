"""Several agents installing the same bundle into one cache directory at the same moment.

The crash this guards against: every installer unpacked into one shared ``.<sha>.partial`` directory and
removed it first, so a second installer deleted the first one's files mid-way (``No such file or directory:
'<cache>/bundles/.<sha>.partial/eval_model.onnx'``). The whole-federation version (four real agents sharing a
cache and all training round 1) is in tests/test_agent_leave.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from coordinator.runner import build_bundles
from edge_agent.bundle_store import BundleStore
from tests.test_faults import tiny_config

INSTALL = """
import sys, time
from pathlib import Path
from edge_agent.bundle_store import BundleStore
archive, root, go, sha = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
while not go.exists():
    time.sleep(0.001)
for _ in range(5):
    store = BundleStore(root)
    store.install(sha, archive)
    assert store.manifest(sha).backbone
print("ok")
"""


def test_eight_processes_install_one_bundle_into_one_cache_at_once(tmp_path: Path) -> None:
    bundle = build_bundles(tiny_config({"a1": "tiny-3"}, backbones=("tiny-3",)))["tiny-3"]
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(bundle.archive_bytes())
    root, go = tmp_path / "cache" / "bundles", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", INSTALL, str(archive), str(root), str(go), bundle.sha256],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(2.0)  # every process is importing or already waiting for the start signal
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err[-1500:] for _, err in outputs]
    store = BundleStore(root)
    assert store.has(bundle.sha256) and store.manifest(bundle.sha256) == bundle.manifest
    leftovers = [p.name for p in root.iterdir() if p.name.endswith(".partial")]
    assert not leftovers, leftovers
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [bundle.sha256]
