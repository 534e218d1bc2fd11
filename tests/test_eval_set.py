"""A team's labeled eval set: the JSONL format and its errors, how answers match, a pluggable
scorer, the demo's gold oracle written as one, and the gate refusing a candidate worse on it."""

from __future__ import annotations

import base64
import json
import random

import pytest

from fuseloop.errors import ConfigError
from demo.loop import write_gold_eval_set
from fuseloop.scenes import GoldOracle, SceneTaskConfig, alternative_answer, make_split, png_bytes, render
from tests.test_cli_errors import fuseloop, one_line_error
from tests.test_rollout import broken_checkpoint
from trainer.batches import ContextTensors
from trainer.eval_set import EvalItem, EvalSet, load_eval_set, match_score, write_eval_set
from trainer.evaluate import gold_accuracy
from trainer.gate import GateConfig, run_gate
from trainer.signals import Context

PNG = png_bytes(render(make_split("test", 1)[0].scene))


def first_word(accepted, answer: str) -> float:
    """A pluggable scorer: credit when the first word is right."""
    return float(answer.split()[:1] == accepted[0].split()[:1])


def test_items_come_from_paths_or_base64_and_every_mistake_names_its_line(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(PNG)
    good = tmp_path / "eval.jsonl"
    good.write_text(json.dumps({"image": "img/a.png", "prompt": "What colour?", "answers": ["red"]}) + "\n\n" +
                    json.dumps({"image_base64": base64.b64encode(PNG).decode(), "prompt": "How many?",
                                "answers": "3", "match": "exact"}) + "\n")
    items = load_eval_set(good)
    assert [(i.image, i.answers, i.match) for i in items] == [(PNG, ("red",), "normalized"), (PNG, ("3",), "exact")]
    bad_rows = {
        '{"image": "img/a.png", "prompt": "x"': "eval.jsonl:1: not JSON",
        '{"image": "img/none.png", "prompt": "x", "answers": ["a"]}': "cannot read image 'img/none.png'",
        '{"prompt": "x", "answers": ["a"]}': "needs `image` (a path) or `image_base64`",
        '{"image_base64": "!!", "prompt": "x", "answers": ["a"]}': "image_base64 is not base64",
        '{"image": "img/a.png", "prompt": " ", "answers": ["a"]}': "`prompt` must be a non-empty string",
        '{"image": "img/a.png", "prompt": "x", "answers": []}': "`answers` must be a non-empty list",
        '{"image": "img/a.png", "prompt": "x", "answers": ["a"], "match": "fuzzy"}': "`match` must be one of",
    }
    for row, message in bad_rows.items():
        path = tmp_path / "eval.jsonl"
        path.write_text(row + "\n")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_eval_set(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="has no items"):
        load_eval_set(tmp_path / "empty.jsonl")


def test_answers_match_normalized_exact_or_as_clauses_or_by_a_pluggable_scorer():
    item = lambda match, *answers: EvalItem(PNG, "q", answers, match)  # noqa: E731
    assert match_score(item("normalized", "A red circle."), "a  red, circle") == 1.0
    assert match_score(item("exact", "A red circle."), "a red circle") == 0.0
    assert match_score(item("clauses", "a red circle and a blue square"), "A blue square and a red circle.") == 1.0
    assert match_score(item("clauses", "a red circle and a blue square"), "a red circle") == 0.0
    assert match_score(item("normalized", "crimson", "red"), "Red") == 1.0
    scored = EvalSet([item("normalized", "red circle"), item("normalized", "blue square")], scorer=first_word)
    assert scored.score(["red triangle", "green square"]) == 0.5


def test_a_missing_eval_set_or_scorer_is_one_line_from_the_command_line(tmp_path, shared_repo_dir):
    bus = f"sqlite:///{tmp_path / 'bus.db'}"
    line = one_line_error(fuseloop("train", "--repo", str(shared_repo_dir), "--bus", bus,
                                   "--eval-set", str(tmp_path / "none.jsonl")))
    assert "cannot read the eval set" in line
    good = tmp_path / "eval.jsonl"
    write_eval_set(good, [EvalItem(PNG, "q", ("a",))])
    line = one_line_error(fuseloop("train", "--repo", str(shared_repo_dir), "--bus", bus, "--eval-set", str(good),
                                   "--eval-scorer", "no_such_module:f"))
    assert "cannot load the eval scorer 'no_such_module:f'" in line


@pytest.fixture(scope="module")
def gold_as_eval_set(tmp_path_factory):
    """The demo's gold oracle written out as an eval set, as the demo writes it."""
    examples = make_split("test", 60)
    return examples, write_gold_eval_set(tmp_path_factory.mktemp("eval") / "gold.jsonl", examples, SceneTaskConfig())


def test_the_gold_oracle_written_as_an_eval_set_scores_exactly_as_the_oracle(gold_as_eval_set, quick_checkpoint):
    examples, eval_set = gold_as_eval_set
    rng, oracle = random.Random(0), GoldOracle()
    answers = []
    for e in examples:  # right, reordered, half right and wrong answers
        clauses = e.answer.split(" and ")
        pick = rng.random()
        if pick < 0.3:
            answers.append(e.answer)
        elif pick < 0.5:
            answers.append(" and ".join(reversed(clauses)).upper() + ".")
        elif pick < 0.7:
            answers.append(clauses[0])
        else:
            answers.append(alternative_answer(e, rng))
    want = sum(oracle.correct(e, a) for e, a in zip(examples, answers)) / len(examples)
    assert eval_set.score(answers) == pytest.approx(want)
    ck = quick_checkpoint
    assert eval_set.accuracy(ck.family, ck.policy, ck.preprocessor) == pytest.approx(
        gold_accuracy(ck.family, ck.policy, ck.preprocessor, examples).accuracy)


def test_the_gate_refuses_a_candidate_worse_on_the_eval_set_by_more_than_the_margin(gold_as_eval_set,
                                                                                     quick_checkpoint):
    examples, eval_set = gold_as_eval_set
    ck = quick_checkpoint
    broken = broken_checkpoint(ck, next(t for t in ("at", "of", "the") if t in ck.preprocessor.tokenizer.get_vocab()))
    tensors = ContextTensors(ck.preprocessor)
    heldout = [Context(e.prompt, png_bytes(render(e.scene)), f"r{i}") for i, e in enumerate(examples[:16])]

    def check(policy) -> float:
        return eval_set.accuracy(ck.family, policy, ck.preprocessor)

    serving_accuracy = check(ck.policy)
    assert serving_accuracy > 0  # the margin below is smaller than what the broken policy loses
    lenient = GateConfig(min_reward_gain=-1e9, eval_margin=serving_accuracy / 2, kl_budget=1e9)
    refused = run_gate(ck.family, broken.policy, ck.policy, ck.reward, tensors, heldout, 0.0, lenient, check)
    assert not refused.passed and refused.gold_candidate == 0.0
    assert any("eval-set accuracy 0.000 is below serving's" in r for r in refused.reasons)
    same = run_gate(ck.family, ck.policy, ck.policy, ck.reward, tensors, heldout, 0.0, lenient, check)
    assert same.passed  # ties pass: "not worse", not "better"
