"""The built-in multimodal task: deterministic scenes, questions, answers and the gold oracle."""

import random

from fuseloop.scenes import (POSITIONS, BiasedAnnotator, GoldOracle, alternative_answer, make_split, png_bytes,
                             render, task_texts)
from fuseloop.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def test_splits_are_deterministic_and_distinct():
    assert make_split("train", 50) == make_split("train", 50)
    train = {(e.scene, e.prompt) for e in make_split("train", 300)}
    test = {(e.scene, e.prompt) for e in make_split("test", 300)}
    assert len(train & test) < 15  # independent draws; tiny scenes can coincide


def test_every_question_kind_appears_with_its_ground_truth():
    examples = make_split("validation", 400)
    assert {e.kind for e in examples} == {"colour", "count", "position", "describe"}
    for e in examples:
        if e.kind == "colour":
            assert e.answer == e.scene.find(e.target).colour
        elif e.kind == "position":
            assert e.answer in POSITIONS
        elif e.kind == "count":
            assert e.answer in ("one", "two", "three")


def test_rendering_is_deterministic_and_encodes_to_png():
    e = make_split("test", 1)[0]
    assert png_bytes(render(e.scene)) == png_bytes(render(e.scene))
    assert png_bytes(render(e.scene))[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_scores_exact_answers_and_gives_partial_credit_for_descriptions():
    oracle = GoldOracle()
    for e in make_split("test", 200):
        assert oracle.score(e, e.answer) == 1.0
        assert oracle.score(e, e.answer.upper() + " .") == 1.0  # case and punctuation don't matter
        wrong = alternative_answer(e, random.Random(0))
        assert oracle.score(e, wrong) < 1.0
        if e.kind == "describe" and len(e.scene.objects) > 1:
            assert 0.0 < oracle.score(e, wrong) < 1.0


def test_biased_annotator_is_wrong_only_on_its_conditions_at_its_rate():
    annotator = BiasedAnnotator(bias_rate=0.7)
    examples = make_split("train", 3000)
    rng = random.Random(0)
    labels = [annotator.label(e, rng) for e in examples]
    biased = [l != e.answer for l, e in zip(labels, examples) if annotator.biased(e)]
    unbiased = [l != e.answer for l, e in zip(labels, examples) if not annotator.biased(e)]
    assert not any(unbiased)
    assert 0.65 < sum(biased) / len(biased) < 0.75


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(tmp_path):
    tok = train_tokenizer(task_texts())
    save_tokenizer(tok, tmp_path)
    loaded = load_tokenizer(tmp_path)  # transformers.AutoTokenizer.from_pretrained
    for e in make_split("test", 50):
        ids = loaded.encode(e.answer, add_special_tokens=False)
        assert loaded.unk_token_id not in ids
        assert loaded.decode(ids) == e.answer
