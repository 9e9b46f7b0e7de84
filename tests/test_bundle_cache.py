"""The bundle cache: a recipe key that changes whenever the code that shapes a bundle's bytes or measures its cost
cards changes, and builds that two processes can ask for at once.

A cost card is the peak RSS of the agent's own round code, so a key that hashed only the exporter and the probe
module let a bundle keep a card measured by older agent code (CI once read a 317 MB torch card from such a
cached bundle where fresh probes read 386-401 MB). These tests copy the keyed packages to a temporary tree and
change one file at a time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import export.bundle
from export.bundle import CODE_PACKAGES, code_digest

REPO = Path(export.bundle.__file__).parent.parent


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for package in CODE_PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_copied_tree_has_the_repositorys_digest(tree: Path) -> None:
    assert code_digest(tree) == code_digest(REPO)


@pytest.mark.parametrize("module", ["export/onnx_export.py", "edge_agent/probe.py", "edge_agent/page_cache.py",
                                    "edge_agent/local_round.py", "edge_agent/trainers/torch_backend.py"])
def test_a_change_to_exporter_probe_or_agent_code_changes_the_key(tree: Path, module: str) -> None:
    before = code_digest(tree)
    path = tree / module
    path.write_text(path.read_text() + "\n# changed\n")
    assert code_digest(tree) != before


def test_moving_code_between_files_changes_the_key(tree: Path) -> None:
    # the digest covers file names too, so the same bytes under another name are another recipe
    before = code_digest(tree)
    (tree / "edge_agent" / "page_cache.py").rename(tree / "edge_agent" / "page_cache_moved.py")
    assert code_digest(tree) != before


def test_code_outside_the_keyed_packages_does_not_rebuild_bundles(tree: Path) -> None:
    before = code_digest(tree)
    (tree / "coordinator").mkdir()
    (tree / "coordinator" / "engine.py").write_text("x = 1\n")
    assert code_digest(tree) == before


BUILD_ONE = """
import sys
from pathlib import Path
from export.bundle import BundleRecipe, TaskSpec, build_bundle
bundle = build_bundle(BundleRecipe("tiny-3", TaskSpec("t", ("a", "b"), max_length=16, batch_size=4)),
                      root=Path(sys.argv[1]), measure_cost=False)
print(bundle.sha256)
"""


def test_two_processes_asking_for_one_bundle_build_it_once(tmp_path: Path) -> None:
    # Both start before either can finish (an export takes seconds): without the lock, both exported into the same
    # .building directory and one deleted the other's files (a benchmark crashed that way beside another one).
    builders = [subprocess.Popen([sys.executable, "-c", BUILD_ONE, str(tmp_path)], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [b.communicate(timeout=300) for b in builders]
    assert [b.returncode for b in builders] == [0, 0], [err[-2000:] for _, err in outputs]
    shas = {out.strip() for out, _ in outputs}
    assert len(shas) == 1 and len(next(iter(shas))) == 64
    assert sum(err.count("[export] building bundle") for _, err in outputs) == 1
    built = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert len(built) == 1 and not built[0].endswith(".building"), built
