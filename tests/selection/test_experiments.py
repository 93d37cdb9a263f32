"""Experiments: validated files, deterministic arm assignment by keyed user hash, shares honoured."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kernel.errors import ExperimentError, UnknownName
from kernel.hashing import user_key
from kernel.settings import Settings
from selection.experiments import Experiment, experiment_from_settings, load_experiment, parse_experiment

SECRET = b"k" * 32
GOOD = """
name: fusion-vs-llm
arms:
  - name: default
    share: 0.5
  - name: explore
    share: 0.3
    variant:
      exploration: {method: softmax, temperature: 0.5, top_m: 5}
  - name: no-llm
    share: 0.2
    variant: {llm: false, weights: w/no_llm.json, prompt: rerank}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    (tmp_path / "w").mkdir(exist_ok=True)
    (tmp_path / "w" / "no_llm.json").write_text("{}")
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_valid_file_loads_with_weights_resolved_against_it(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, GOOD), prompt_names={"rerank"})
    assert [a.name for a in exp.arms] == ["default", "explore", "no-llm"]
    assert exp.arm("no-llm").variant.weights == (tmp_path / "w" / "no_llm.json").resolve()
    assert exp.arm("explore").variant.exploration.method == "softmax"
    assert exp.arm("default").variant.exploration.method == "off" and exp.arm("default").variant.llm is None
    with pytest.raises(UnknownName):
        exp.arm("defualt")


def test_assignment_is_deterministic_and_honours_shares(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, GOOD))
    keys = [user_key(f"user-{i}", secret=SECRET) for i in range(20000)]
    arms = [exp.assign(k).name for k in keys]
    assert arms == [exp.assign(k).name for k in keys]  # stable
    again = load_experiment(write(tmp_path, GOOD))  # a fresh load (another process) agrees
    assert arms[:500] == [again.assign(k).name for k in keys[:500]]
    counts = Counter(arms)
    for a in exp.arms:  # binomial sd at n=20000 is < 0.0036: five sd is 0.018
        assert abs(counts[a.name] / len(keys) - a.share) < 0.018
    renamed = parse_experiment({**json.loads(json.dumps(exp.model_dump(mode="json"))), "name": "other"})
    moved = sum(a != renamed.assign(k).name for a, k in zip(arms, keys))
    assert moved > 0.3 * len(keys)  # the experiment name salts the assignment


def test_without_an_experiment_every_user_is_on_default(tmp_path: Path) -> None:
    exp = experiment_from_settings(Settings(_env_file=None, data_dir=tmp_path))
    assert {exp.assign(user_key(f"u{i}", secret=SECRET)).name for i in range(100)} == {"default"}
    path = write(tmp_path, GOOD)
    assert experiment_from_settings(Settings(_env_file=None, experiment_path=path)).name == "fusion-vs-llm"


@pytest.mark.parametrize(
    "text, where",
    [
        ("name: e\narms: [{name: a, share: 0.5}, {name: b, share: 0.4}]", "sum to 1"),
        ("name: e\narms: [{name: a, share: 1.0, colour: red}]", "arms.0.colour"),
        ("name: e\narms: [{name: a, share: 1.0, variant: {llm: false, temprature: 1}}]", "arms.0.variant.temprature"),
        ("name: e\narms: [{name: a, share: 1.0, variant: {exploration: {method: ucb}}}]", "arms.0.variant.exploration.method"),
        ("name: e\narms: [{name: a, share: 0.5}, {name: a, share: 0.5}]", "unique"),
        ("name: e\narms: [{name: a, share: 0}, {name: b, share: 1}]", "arms.0.share"),
        ("name: e\narms: []", "arms"),
        ("name: 'bad name'\narms: [{name: a, share: 1}]", "name"),
        ("name: e\nbranches: []\narms: [{name: a, share: 1}]", "branches"),
        ("name: e\narms: [{name: a, share: 1, variant: {weights: missing.json}}]", "no file"),
        ("name: e\narms: [{name: a, share: 1\n", "not valid YAML"),
    ],
)
def test_an_invalid_file_is_refused_with_a_typed_error_naming_the_problem(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ExperimentError) as e:
        load_experiment(path)
    assert e.value.path == str(path) and where in e.value.reason


def test_json_files_and_unknown_prompts(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"name": "e", "arms": [{"name": "a", "share": 1, "variant": {"prompt": "rerank_v9"}}]}), "e.json")
    assert load_experiment(path).arm("a").variant.prompt == "rerank_v9"
    with pytest.raises(UnknownName):
        load_experiment(path, prompt_names={"rerank"})
    with pytest.raises(ExperimentError):
        load_experiment(tmp_path / "absent.yaml")


def test_single_arm_experiment_is_valid() -> None:
    assert Experiment.single().arms[0].share == 1.0
