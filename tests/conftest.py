"""Shared fixtures: the real test model (assembled once per session into a cache directory) and an
isolated data home for every test."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_file import gemma_model_file  # tests/ is on sys.path (pytest's rootdir import mode)


@pytest.fixture(scope="session")
def test_model_path() -> Path:
    """Gemma 3 270M Q4_K_M (a base model with no chat template), from its PyPI package."""
    return gemma_model_file()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point LOCALBOT_HOME at a fresh directory so no test touches the user's real data."""
    home = tmp_path_factory.mktemp("localbot-home")
    monkeypatch.setenv("LOCALBOT_HOME", str(home))
    # Never the checkout's models/ folder: tests get their own.
    monkeypatch.setenv("LOCALBOT_MODELS_DIR", str(home / "models"))
    return home
