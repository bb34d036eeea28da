"""Shared fixtures: the two real test models and an isolated data home for every test.

Every test that loads a model is marked ``model`` (automatically, from the fixtures it uses), so
``pytest -m "not model"`` is the fast tier: pure logic, files and the CLI's model-free paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from model_file import MODEL_FILES, gemma_model_file, smollm2_model_file

# Fixtures that hand a test a real GGUF: using any of them (directly or through another fixture)
# marks the test `model`.
MODEL_FIXTURES = {"test_model_path", "smol_model_path", "any_model_path"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def test_model_path() -> Path:
    """Gemma 3 270M Q4_K_M (a base model with no chat template), from its PyPI package."""
    return gemma_model_file()


@pytest.fixture(scope="session")
def smol_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (ChatML template with a default system prompt in its GGUF)."""
    return smollm2_model_file()


@pytest.fixture(scope="session", params=sorted(MODEL_FILES))
def any_model_path(request: pytest.FixtureRequest) -> Path:
    """Each real test model in turn: SmolLM2 (its own template) and Gemma (no template)."""
    return MODEL_FILES[request.param]()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point LOCALBOT_HOME at a fresh directory so no test touches the user's real data."""
    home = tmp_path_factory.mktemp("localbot-home")
    monkeypatch.setenv("LOCALBOT_HOME", str(home))
    # Never the checkout's models/ folder: tests get their own.
    monkeypatch.setenv("LOCALBOT_MODELS_DIR", str(home / "models"))
    return home


@pytest.fixture(autouse=True)
def _no_background_work_left_running():
    """Stop what a test's chatbots still do in the background when it ends (reading the next
    prompt, an idle KV-state save seconds later), so that it does not load the machine's cores
    while later tests measure time or wait on threads."""
    yield
    kv_sessions = sys.modules.get("localbot.kv_sessions")
    if kv_sessions is not None:
        for cache in list(kv_sessions._open):
            cache.stop_background()
