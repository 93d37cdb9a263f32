"""`adselect eval tune --ray`: the feature rows on actors of a local Ray (2 CPUs), the same weights out."""
from __future__ import annotations

import json
from pathlib import Path


from eval.tune_run import TuneOptions, run_tune
from selection.fusion import FusionModel
from tests.eval.conftest import MIND

import ray  # noqa: E402 - a real dependency (the ray extra): missing, the tests fail, never skip


def _training_file(tmp_path: Path) -> tuple[Path, Path]:
    """MIND impressions, every other one without its logged candidates (random + hard negatives), and a
    file of impressions whose users are kept out."""
    lines = [json.loads(x) for x in (MIND / "impressions_dev.jsonl").read_text().splitlines() if x.strip()]
    for i, rec in enumerate(lines):
        if i % 2:
            rec["candidates"] = []
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in lines))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in lines[3:8]))
    return train, held


def test_tune_on_ray_fits_the_single_process_weights(eval_settings, tmp_path: Path) -> None:
    from eval.distributed import RayBackend, ray_session

    train, held = _training_file(tmp_path)

    def opts(name: str) -> TuneOptions:
        return TuneOptions(
            ads=MIND / "ads.jsonl", impressions=train, out=tmp_path / f"{name}.json", exclude=[held],
            n_random=5, n_hard=3, max_impressions=30, seed=3, interactions=False,
        )  # fmt: skip

    single = run_tune(opts("single"), settings=eval_settings, show_progress=False)
    with ray_session():
        on_ray = run_tune(opts("ray"), settings=eval_settings, show_progress=False, backend=RayBackend(workers=2, batch_size=4))
    assert not ray.is_initialized()
    a, b = FusionModel.load(tmp_path / "single.json"), FusionModel.load(tmp_path / "ray.json")
    assert single["train_impressions"] == on_ray["train_impressions"] == 30 and single["rows"] == on_ray["rows"]
    assert a.meta["train_lines_read"] == b.meta["train_lines_read"] < 54  # stopped at max_impressions, one record past
    wa, wb = a.to_json(), b.to_json()
    for key in ("features", "mean", "scale", "coef", "intercept", "interactions", "llm_coef", "calibration"):
        assert wa[key] == wb[key], key
