"""Simulated users: they ask about scenes, look at the answers and give explicit and implicit
feedback. Their judgements come from the gold oracle, with noise, position bias and, if asked, a
systematic liking for longer answers, right or wrong (the bias an eval set has to catch)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fuseloop.events import EVENT_SCHEMA_VERSION, new_id, now_ms
from fuseloop.scenes import Example, GoldOracle
from fuseloop.v1 import events_pb2


@dataclass(frozen=True)
class UserModel:
    noise: float = 0.1  # chance a judgement is flipped
    position_bias: float = 0.7  # on a tie, chance the left/top answer is preferred
    examine: tuple[float, ...] = (1.0, 0.55)  # chance a response in slot k is read at all
    pair_share: float = 0.35  # requests that show two answers and ask which is better
    explicit_share: float = 0.6  # single answers that get thumbs/rating/correction
    rating_share: float = 0.3
    correction_share: float = 0.25  # of wrong answers that get explicit feedback
    # Chance a judgement goes by length instead: of two answers the longer wins, and one answer
    # longer than the right one is judged good. Unlike noise, this does not wash out.
    length_bias: float = 0.0
    session_requests: int = 20  # a user starts a new session after this many requests (canaries split by session)


@dataclass(frozen=True)
class Shown:
    response_id: str
    text: str
    position: int


def _event(response_id: str, session_id: str, user_id: str, **signal) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(schema_version=EVENT_SCHEMA_VERSION, event_id=new_id(), response_id=response_id,
                                    session_id=session_id, user_id=user_id, timestamp_ms=now_ms(), **signal)


class SimulatedUser:
    def __init__(self, user_id: str, model: UserModel, oracle: GoldOracle, rng: random.Random) -> None:
        self.user_id, self.model, self.oracle, self.rng = user_id, model, oracle, rng
        self.session_id = new_id()

    def new_session(self) -> None:
        self.session_id = new_id()

    def wants_pair(self) -> bool:
        return self.rng.random() < self.model.pair_share

    def judge(self, example: Example, answer: str) -> bool:
        if self._by_length() and len(answer.split()) > len(example.answer.split()):
            return True
        correct = self.oracle.correct(example, answer)
        return correct if self.rng.random() >= self.model.noise else not correct

    def _by_length(self) -> bool:
        return self.model.length_bias > 0 and self.rng.random() < self.model.length_bias

    def react(self, example: Example, shown: list[Shown]) -> list[events_pb2.FeedbackEvent]:
        """Feedback for what was shown (1 or 2 answers), ordered as the user would send it."""
        if len(shown) >= 2:
            return self._compare(example, shown[0], shown[1])
        return self._single(example, shown[0])

    def _compare(self, example: Example, a: Shown, b: Shown) -> list[events_pb2.FeedbackEvent]:
        left, right = sorted((a, b), key=lambda s: s.position)
        sl, sr = self.oracle.score(example, left.text), self.oracle.score(example, right.text)
        nl, nr = len(left.text.split()), len(right.text.split())
        if nl != nr and self._by_length():
            prefer_left = nl > nr
        elif sl == sr:
            prefer_left = self.rng.random() < self.model.position_bias
        else:
            prefer_left = (sl > sr) if self.rng.random() >= self.model.noise else (sl < sr)
        chosen, rejected = (left, right) if prefer_left else (right, left)
        side = {left.response_id: events_pb2.SIDE_LEFT, right.response_id: events_pb2.SIDE_RIGHT}
        pref = events_pb2.Preference(chosen_response_id=chosen.response_id, rejected_response_id=rejected.response_id,
                                     chosen_side=side[chosen.response_id], rejected_side=side[rejected.response_id])
        out = [_event(chosen.response_id, self.session_id, self.user_id, preference=pref)]
        out += self._implicit(example, left, 2) + self._implicit(example, right, 2)
        return out

    def _single(self, example: Example, s: Shown) -> list[events_pb2.FeedbackEvent]:
        out = []
        good = self.judge(example, s.text)
        m = self.model
        if self.rng.random() < m.explicit_share:
            if not good and self.rng.random() < m.correction_share:
                out.append(_event(s.response_id, self.session_id, self.user_id,
                                  correction=events_pb2.Correction(text=example.answer)))
            elif self.rng.random() < m.rating_share:
                stars = self.rng.choice((4, 5)) if good else self.rng.choice((1, 2))
                out.append(_event(s.response_id, self.session_id, self.user_id, rating=events_pb2.Rating(stars=stars)))
            else:
                out.append(_event(s.response_id, self.session_id, self.user_id, thumbs=events_pb2.Thumbs(up=good)))
        return out + self._implicit(example, s, 1)

    def _implicit(self, example: Example, s: Shown, num_displayed: int) -> list[events_pb2.FeedbackEvent]:
        examine = self.model.examine[min(s.position, len(self.model.examine) - 1)]
        if self.rng.random() >= examine:
            return []
        good = self.judge(example, s.text)
        imp = events_pb2.Implicit(display_position=s.position, num_displayed=num_displayed)
        if good:
            imp.kind = self.rng.choice((events_pb2.IMPLICIT_COPY, events_pb2.IMPLICIT_CLICK, events_pb2.IMPLICIT_DWELL))
            imp.dwell_ms = self.rng.randint(4000, 15000) if imp.kind == events_pb2.IMPLICIT_DWELL else 0
        else:
            imp.kind = self.rng.choice((events_pb2.IMPLICIT_REGENERATE, events_pb2.IMPLICIT_ABANDON,
                                        events_pb2.IMPLICIT_DWELL))
            imp.dwell_ms = self.rng.randint(200, 2500) if imp.kind == events_pb2.IMPLICIT_DWELL else 0
        return [_event(s.response_id, self.session_id, self.user_id, implicit=imp)]
