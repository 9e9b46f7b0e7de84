"""A bundle's recipe key must change whenever the code that shapes its bytes or measures its cost cards changes.

A cost card is the peak RSS of the agent's own round code, so a key that hashed only the exporter and the probe
module let a bundle keep a card measured by older agent code (CI once read a 317 MB torch card from such a
cached bundle where fresh probes read 386-401 MB). These tests copy the keyed packages to a temporary tree and
change one file at a time.
"""

from __future__ import annotations

import shutil
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
