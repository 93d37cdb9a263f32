"""What the service starts with: a configured weights file that is not there stops start-up (no silent
fallback to the shipped weights); the hand-tuned fallback gives the LLM no weight."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kernel.errors import ConfigError
from kernel.settings import Settings
from selection.fusion import FusionModel
from selection.services import build_services
from server.app import create_app


def test_missing_configured_weights_file_is_a_start_up_error(tmp_path: Path, demo_settings, monkeypatch):
    typo = tmp_path / "fusion.jsno"
    monkeypatch.setenv("ADSELECT_WEIGHTS_PATH", str(typo))
    settings = Settings(_env_file=None, data_dir=demo_settings.data_dir, llm_enabled=False)
    with pytest.raises(ConfigError) as info:
        settings.resolved_weights_path()
    assert info.value.setting == "ADSELECT_WEIGHTS_PATH" and str(typo) in str(info.value)
    with pytest.raises(ConfigError):
        build_services(settings, serving=False)
    with pytest.raises(ConfigError), TestClient(create_app(settings)):
        pass  # the lifespan builds the services: the app never starts serving
    with pytest.raises(ConfigError):
        FusionModel.load(typo)


def test_unset_weights_path_still_falls_back(demo_settings):
    assert Settings(_env_file=None, data_dir=demo_settings.data_dir).resolved_weights_path() is None
    assert FusionModel.load(None).meta["path"].endswith("default_weights.json")


def test_hand_tuned_fallback_gives_the_llm_no_weight():
    model = FusionModel.hand_tuned()
    assert model.llm_coef == 0.0
    prior = np.array([0.3, 0.2, 0.1])
    assert np.array_equal(model.fused_scores(prior, [2, 1, 0]), prior)  # the LLM cannot reorder anything
