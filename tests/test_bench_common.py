"""Benchmark provenance: every results page and kept federation names the commit that produced it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.common import git_commit


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_the_commit_is_read_in_a_checkout_and_in_a_linked_worktree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("one")
    git(repo, "add", "a.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "a.txt").write_text("two")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "second")
    second = git(repo, "rev-parse", "HEAD")
    git(repo, "worktree", "add", "-q", "--detach", str(tmp_path / "detached"), first)
    git(repo, "worktree", "add", "-q", "-b", "side", str(tmp_path / "branch"))
    git(repo, "pack-refs", "--all")  # branch refs now only in packed-refs of the shared git directory

    assert git_commit(repo) == second[:12]
    assert git_commit(tmp_path / "detached") == first[:12]  # the sweep worktree's case (its pages said 'unknown')
    assert git_commit(tmp_path / "branch") == second[:12]
    assert git_commit(tmp_path) == "unknown"
