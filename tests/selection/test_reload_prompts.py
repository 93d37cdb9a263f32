"""A reload reads every prompt the service uses again (selection.services.reload_prompts): the scoring
mode's prompt and the copy prompt as well as the listwise one; a broken prompt refuses the reload."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from kernel.errors import ReloadRefused
from kernel.settings import REPO_ROOT
from selection.services import build_services, reload_services

UNUSED_URL = "http://127.0.0.1:9/v1"  # the stages are built over it; nothing is served, so nothing is called


def edit(prompts: Path, name: str, **fields: str) -> None:
    path = prompts / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    doc.update(fields)
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))


def test_reload_rereads_the_score_and_copy_prompts_and_refuses_a_broken_one(demo_settings, embedder, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    shutil.copytree(REPO_ROOT / "prompts", prompts)
    settings = demo_settings.model_copy(update={"llm_mode": "score", "prompts_dir": prompts, "llm_enabled": True})
    svc = build_services(settings, llm_url=UNUSED_URL, embedder=embedder, serving=False)
    try:
        scorer, copier = svc.selector.scorer, svc.selector.copier
        assert scorer is not None and copier is not None
        before_score, before_copy = scorer.prompt.sha256, copier.rewriter.prompt.sha256
        edit(prompts, settings.score_prompt_name, version="99")
        edit(prompts, settings.copy_prompt_name, version="98")
        new = reload_services(svc)
        assert new.selector.scorer.prompt.sha256 != before_score and new.selector.scorer.prompt.version == "99"
        assert new.selector.scorer.llm is scorer.llm  # the same logprob client: nothing reconnects
        assert new.selector.scorer.permutations == settings.score_permutations
        assert new.selector.copier is copier and copier.rewriter.prompt.sha256 != before_copy
        assert copier.rewriter.prompt.version == "98"

        edit(prompts, settings.score_prompt_name, variables=["history"])  # no longer what the scorer fills
        good_copy = copier.rewriter.prompt
        edit(prompts, settings.copy_prompt_name, version="97")
        with pytest.raises(ReloadRefused) as refused:
            reload_services(new)
        assert refused.value.component == "prompts"
        assert copier.rewriter.prompt is good_copy  # a refused reload changes nothing, the shared copier included
    finally:
        svc.close()
