"""The gold oracle: scores any answer to any scene. Evaluation and simulated users use it;
the trainer never does."""

from __future__ import annotations

from fuseloop.scenes.task import Example


def _normalize(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in _normalize(text).split(" and ") if c.strip()]


class GoldOracle:
    """`score` is 1.0 for a fully correct answer; partial credit only for `describe` (clause F1)."""

    def score(self, example: Example, answer: str) -> float:
        if example.kind != "describe":
            return float(_normalize(answer) == _normalize(example.answer))
        want, got = _clauses(example.answer), _clauses(answer)
        if not got:
            return 0.0
        hits = sum(1 for c in set(got) if c in want)
        precision, recall = hits / len(got), hits / len(want)
        return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)

    def correct(self, example: Example, answer: str) -> bool:
        return self.score(example, answer) == 1.0
