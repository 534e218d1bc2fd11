"""A team's own labeled eval set, and the gate check it gives: a candidate must not be worse on it
than the serving version by more than a margin (`GateConfig.eval_margin`).

JSONL, one item per line; image paths are relative to the file:

    {"image": "images/0001.png", "prompt": "What colour is the circle?", "answers": ["red", "crimson"]}
    {"image_base64": "iVBORw0KGgo...", "prompt": "How many shapes?", "answers": ["3"], "match": "exact"}

An answer scores 1 when it matches one of the accepted answers: `normalized` (the default: case,
punctuation and spacing ignored), `exact`, or `clauses` (the same "and"-separated clauses in any
order). A pluggable scorer (`--eval-scorer package.module:function`, called as
`function(accepted_answers, answer) -> float in [0, 1]`) replaces the match for the whole set.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fuseloop.errors import ConfigError
from fuseloop.families import ModelFamily
from fuseloop.preprocessing import Preprocessor

Scorer = Callable[[Sequence[str], str], float]
MATCHES = ("normalized", "exact", "clauses")


@dataclass(frozen=True)
class EvalItem:
    image: bytes
    prompt: str
    answers: tuple[str, ...]
    match: str = "normalized"


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _clauses(text: str) -> tuple[str, ...]:
    return tuple(sorted(c.strip() for c in normalize(text).split(" and ") if c.strip()))


def match_score(item: EvalItem, answer: str) -> float:
    if item.match == "exact":
        return float(answer.strip() in {a.strip() for a in item.answers})
    if item.match == "clauses":
        return float(_clauses(answer) in {_clauses(a) for a in item.answers})
    return float(normalize(answer) in {normalize(a) for a in item.answers})


def load_scorer(spec: str) -> Scorer:
    """`package.module:function` -> the function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--eval-scorer must be package.module:function, got {spec!r}")
    try:
        scorer = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load the eval scorer {spec!r}: {e}") from None
    if not callable(scorer):
        raise ConfigError(f"the eval scorer {spec!r} is not callable")
    return scorer


def load_eval_set(path: Path) -> list[EvalItem]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the eval set {path}: {e.strerror}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            items.append(_item(_parse(line, path, n), path, n))
    if not items:
        raise ConfigError(f"the eval set {path} has no items")
    return items


def _parse(line: str, path: Path, n: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{path}:{n}: an item is a JSON object with image, prompt and answers")
    return row


def _item(row: dict, path: Path, n: int) -> EvalItem:
    where = f"{path}:{n}"
    if "image" in row:
        try:
            image = (path.parent / str(row["image"])).read_bytes()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read image {row['image']!r}: {e.strerror}") from None
    elif "image_base64" in row:
        try:
            image = base64.b64decode(str(row["image_base64"]), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: image_base64 is not base64") from None
    else:
        raise ConfigError(f"{where}: needs `image` (a path) or `image_base64`")
    prompt, answers, match = row.get("prompt"), row.get("answers"), row.get("match", "normalized")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: `prompt` must be a non-empty string")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"{where}: `answers` must be a non-empty list of strings")
    if match not in MATCHES:
        raise ConfigError(f"{where}: `match` must be one of {', '.join(MATCHES)}, got {match!r}")
    return EvalItem(image, prompt, tuple(answers), match)


def write_eval_set(path: Path, items: list[EvalItem]) -> None:
    """One JSONL file, images inline (the demo writes its gold set so)."""
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps({"image_base64": base64.b64encode(it.image).decode(), "prompt": it.prompt,
                                "answers": list(it.answers), "match": it.match}) + "\n")


class EvalSet:
    """Items plus how answers are scored; `accuracy` of a policy is its mean greedy score."""

    def __init__(self, items: list[EvalItem], scorer: Scorer | None = None, batch_size: int = 128) -> None:
        self.items, self.scorer, self.batch_size = items, scorer, batch_size

    @classmethod
    def from_file(cls, path: Path, scorer: str | None = None) -> "EvalSet":
        return cls(load_eval_set(path), load_scorer(scorer) if scorer else None)

    def score(self, answers: list[str]) -> float:
        if self.scorer is not None:
            return sum(float(self.scorer(it.answers, a)) for it, a in zip(self.items, answers)) / len(self.items)
        return sum(match_score(it, a) for it, a in zip(self.items, answers)) / len(self.items)

    def answers(self, family: ModelFamily, policy: torch.nn.Module, pre: Preprocessor) -> list[str]:
        """Greedy answers, through the one preprocessing home (images the way serving decodes them)."""
        policy.eval()
        out: list[str] = []
        with torch.no_grad():
            for i in range(0, len(self.items), self.batch_size):
                batch = self.items[i: i + self.batch_size]
                pixels = torch.from_numpy(pre.images([it.image for it in batch]))
                ids, mask = (torch.from_numpy(a) for a in pre.prompts([it.prompt for it in batch]))
                tokens, _ = family.generate(policy, pixels, ids, mask, pre.config.max_response_tokens, 0.0)
                out += [pre.decode(row.tolist()) for row in tokens]
        return out

    def accuracy(self, family: ModelFamily, policy: torch.nn.Module, pre: Preprocessor) -> float:
        return self.score(self.answers(family, policy, pre))
