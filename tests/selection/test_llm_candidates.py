"""One rule for how many candidates the LLM is sent (Settings.llm_candidates), used by the server and eval."""
from __future__ import annotations

from kernel.settings import Settings


def test_the_bundled_model_gets_the_smaller_count():
    s = Settings(_env_file=None, llm_max_candidates=20, local_llm_max_candidates=6)
    assert (s.llm_candidates(bundled_model=True), s.llm_candidates(bundled_model=False)) == (6, 20)
    fewer = Settings(_env_file=None, llm_max_candidates=4, local_llm_max_candidates=6)
    assert fewer.llm_candidates(bundled_model=True) == 4  # eval used to send 6 here, the server 4
