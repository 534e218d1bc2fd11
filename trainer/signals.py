"""From joined feedback to training examples: one kind of example per signal, with weights.

Implicit signals are weak labels. Their display positions were randomized at display time, so
the positive rate per position estimates the examination propensity p_k (relative to the top
slot), and positives are reweighted by 1 / p_k (inverse propensity weighting).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from fuseloop.v1 import events_pb2
from trainer.store import DatasetStore, FeedbackRow, ResponseRow

POSITIVE_IMPLICIT = {events_pb2.IMPLICIT_COPY, events_pb2.IMPLICIT_CLICK}
NEGATIVE_IMPLICIT = {events_pb2.IMPLICIT_REGENERATE, events_pb2.IMPLICIT_ABANDON}


@dataclass(frozen=True)
class SignalWeights:
    preference: float = 1.0
    rating: float = 1.0
    thumbs: float = 1.0
    correction: float = 1.0
    implicit: float = 0.3
    dwell_positive_ms: int = 4000  # dwelling at least this long counts as a weak positive
    max_ipw: float = 5.0


@dataclass(frozen=True)
class Context:
    """What the model sees: the prompt and the image bytes."""

    prompt: str
    image: bytes
    request_id: str


@dataclass
class TrainingSet:
    pairs: list[tuple[Context, str, str, float]] = field(default_factory=list)  # chosen, rejected, w
    ratings: list[tuple[Context, str, int, float]] = field(default_factory=list)  # text, stars, w
    binary: list[tuple[Context, str, int, float]] = field(default_factory=list)  # text, label, w
    demos: list[tuple[Context, str]] = field(default_factory=list)  # corrections for the policy
    counts: Counter = field(default_factory=Counter)
    weights: dict = field(default_factory=dict)
    unjoined: list[FeedbackRow] = field(default_factory=list)

    def report(self) -> dict:
        return {"counts": dict(self.counts), "weights": self.weights,
                "examples": {"pairs": len(self.pairs), "ratings": len(self.ratings),
                             "binary": len(self.binary), "demos": len(self.demos)},
                "unjoined": len(self.unjoined)}


def context_of(row: ResponseRow) -> Context:
    return Context(row.prompt, row.image, row.request_id)


def implicit_label(signal: events_pb2.Implicit, weights: SignalWeights) -> int | None:
    if signal.kind in POSITIVE_IMPLICIT:
        return 1
    if signal.kind in NEGATIVE_IMPLICIT:
        return 0
    if signal.kind == events_pb2.IMPLICIT_DWELL:
        return int(signal.dwell_ms >= weights.dwell_positive_ms)
    return None


def position_propensities(positives_by_position: Counter, shown_by_position: Counter, max_ipw: float) -> dict[int, float]:
    """p_k = rate_k / rate_0 (the top slot is always examined), floored at 1 / max_ipw."""
    rates = {k: positives_by_position[k] / shown_by_position[k] for k in shown_by_position if shown_by_position[k]}
    top = rates.get(0, 0.0)
    if top <= 0:
        return {k: 1.0 for k in rates}
    return {k: min(1.0, max(1.0 / max_ipw, r / top)) for k, r in rates.items()}


def build_training_set(store: DatasetStore, feedback: list[FeedbackRow], weights: SignalWeights = SignalWeights()
                       ) -> TrainingSet:
    out = TrainingSet()
    implicit_rows: list[tuple[ResponseRow, int, int]] = []  # response, label, position
    for row in feedback:
        ev = events_pb2.FeedbackEvent.FromString(row.payload)
        kind = row.kind
        if kind == "preference":
            chosen = store.response(ev.preference.chosen_response_id)
            rejected = store.response(ev.preference.rejected_response_id)
            if chosen is None or rejected is None:
                out.unjoined.append(row)
                continue
            if chosen.text.strip() == rejected.text.strip():
                out.counts["preference_ties"] += 1  # the same answer twice: no preference to learn
                continue
            out.pairs.append((context_of(chosen), chosen.text, rejected.text, weights.preference))
        else:
            resp = store.response(ev.response_id)
            if resp is None:
                out.unjoined.append(row)
                continue
            ctx = context_of(resp)
            if kind == "rating":
                out.ratings.append((ctx, resp.text, ev.rating.stars, weights.rating))
            elif kind == "thumbs":
                out.binary.append((ctx, resp.text, int(ev.thumbs.up), weights.thumbs))
            elif kind == "correction":
                out.demos.append((ctx, ev.correction.text))
                if ev.correction.text.strip() != resp.text.strip():
                    out.pairs.append((ctx, ev.correction.text, resp.text, weights.correction))
            elif kind == "implicit":
                label = implicit_label(ev.implicit, weights)
                if label is not None:
                    implicit_rows.append((resp, label, ev.implicit.display_position))
        out.counts[kind] += 1

    # Rates per slot over everything shown there (not only what got a signal: an unexamined
    # response sends none, which is exactly the position bias).
    shown, positives = store.shown_by_position(), Counter()
    for _, label, pos in implicit_rows:
        positives[pos] += label
    propensity = position_propensities(positives, shown, weights.max_ipw)
    for resp, label, pos in implicit_rows:
        ipw = 1.0 / propensity.get(pos, 1.0) if label == 1 else 1.0
        out.binary.append((context_of(resp), resp.text, label, weights.implicit * ipw))
    out.weights = {"preference": weights.preference, "rating": weights.rating, "thumbs": weights.thumbs,
                   "correction": weights.correction, "implicit": weights.implicit,
                   "implicit_propensity_by_position": {str(k): round(v, 3) for k, v in sorted(propensity.items())}}
    return out


def group_by_request(items: list) -> dict[str, list]:
    groups = defaultdict(list)
    for item in items:
        groups[item[0].request_id].append(item)
    return groups
