"""Shared fixtures for the network tests: repo import path and the SuPreM facts folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]  # tests/networks/conftest.py -> repo root
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def suprem_facts_dir() -> Path:
    """``<repo>/../shared/suprem``: released key lists and golden vectors (not part of the repo)."""
    return REPO_ROOT.parent / "shared" / "suprem"


@pytest.fixture(scope="session")
def suprem_facts() -> Path:
    path = suprem_facts_dir()
    if not (path / "checkpoint-keys").is_dir() or not (path / "golden").is_dir():
        pytest.skip(f"SuPreM facts folder not found at {path} (expected ../shared/suprem next to the repo)")
    return path


@pytest.fixture(scope="session")
def released_keys(suprem_facts: Path):
    """``released_keys(backbone)``: rows of ``checkpoint-keys/<backbone>.tsv`` as (key, shape)."""

    def read(backbone: str) -> list:
        lines = (suprem_facts / "checkpoint-keys" / f"{backbone}.tsv").read_text().splitlines()
        assert lines[0].split("\t") == ["key", "shape"]
        rows = []
        for line in lines[1:]:
            key, shape = line.split("\t")
            rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else ()))
        return rows

    return read
