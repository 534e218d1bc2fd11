"""The rollout controller: judges a canary by its users' live feedback, then promotes it or
rolls it back by changing the fleet's serving record.

Evidence. Every InferenceEvent names the version that answered and its arm. Feedback on a
response (thumbs, rating, preference, correction, implicit) becomes one score in [0, 1] per
response, the same way for both arms (`response_scores`): the weighted mean of its signals, with
the trainer's own signal weights.

Decision: a sequential non-inferiority test on the difference of mean scores,
d = mean(canary) - mean(stable), with Welch's standard error se. At look k of at most K (one look
per `look_every` new scored responses, once both arms hold `min_samples`), with
z = Phi^-1(1 - alpha / (2K)) (Bonferroni over the looks, two-sided):
    promote   if d - z*se > -margin   (not worse than stable by the margin, with confidence)
    roll back if d + z*se < 0         (worse than stable, with confidence)
    else wait; after K looks or `max_samples` per arm, roll back (not shown non-inferior).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

from fuseloop.bus import EventBus, TopicConfig
from fuseloop.repository import ModelRepository, ServingState
from fuseloop.v1 import events_pb2
from trainer.signals import SignalWeights, implicit_label

log = logging.getLogger(__name__)

PROMOTE, ROLLBACK, WAIT = "promote", "rollback", "wait"


@dataclass(frozen=True)
class RolloutConfig:
    canary_percent: float = 0.0  # the trainer deploys a passing candidate as a canary for this share; 0: straight
    margin: float = 0.05  # how much worse than stable (in mean score, 0..1) still counts as "not worse"
    alpha: float = 0.05  # chance of a wrong confident call, over all looks of one canary
    min_samples: int = 30  # scored responses per arm before the first look
    look_every: int = 20  # new scored responses between looks
    max_looks: int = 20
    max_samples: int = 5000  # per arm: undecided by then, the canary is not shown non-inferior
    poll_records: int = 1000
    read_budget_s: float = 5.0  # reading per step; what is left is read at the next step


def response_scores(event: events_pb2.FeedbackEvent, weights: SignalWeights) -> list[tuple[str, float, float]]:
    """(response_id, score in [0, 1], weight) for what one feedback event says."""
    kind = event.WhichOneof("signal")
    if kind == "thumbs":
        return [(event.response_id, float(event.thumbs.up), weights.thumbs)]
    if kind == "rating" and 1 <= event.rating.stars <= 5:
        return [(event.response_id, (event.rating.stars - 1) / 4, weights.rating)]
    if kind == "correction":
        return [(event.response_id, 0.0, weights.correction)]
    if kind == "preference":
        p = event.preference
        return [(p.chosen_response_id, 1.0, weights.preference), (p.rejected_response_id, 0.0, weights.preference)]
    if kind == "implicit":
        label = implicit_label(event.implicit, weights)
        return [] if label is None else [(event.response_id, float(label), weights.implicit)]
    return []


@dataclass
class Decision:
    action: str
    canary: int
    stable: int
    look: int
    n: dict
    mean: dict
    difference: float
    interval: tuple[float, float]
    test: str
    reason: str
    canary_requests: int = 0
    decided_at_ms: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval"] = [round(x, 4) for x in self.interval]
        d["difference"] = round(self.difference, 4)
        d["mean"] = {k: round(v, 4) for k, v in self.mean.items()}
        return d


def decide(stable: list[float], canary: list[float], look: int, config: RolloutConfig,
           canary_version: int, stable_version: int) -> Decision:
    """One look of the sequential test (formula in the module docstring)."""
    n_s, n_c = len(stable), len(canary)
    mean_s, mean_c = _mean(stable), _mean(canary)
    se = math.sqrt(_var(stable) / max(n_s, 1) + _var(canary) / max(n_c, 1))
    se = max(se, 1e-9)
    z = NormalDist().inv_cdf(1 - config.alpha / (2 * config.max_looks))
    d = mean_c - mean_s
    lo, hi = d - z * se, d + z * se
    test = (f"sequential non-inferiority, margin {config.margin:g}, alpha {config.alpha:g} over "
            f"{config.max_looks} looks (z {z:.2f}), Welch se {se:.4f}")
    common = dict(canary=canary_version, stable=stable_version, look=look, n={"stable": n_s, "canary": n_c},
                  mean={"stable": mean_s, "canary": mean_c}, difference=d, interval=(lo, hi), test=test)
    if hi < 0:
        return Decision(ROLLBACK, reason=f"the canary is worse: its mean score is lower by {-d:.3f} "
                                         f"(upper bound {hi:.3f} < 0)", **common)
    if lo > -config.margin:
        return Decision(PROMOTE, reason=f"the canary is not worse by more than {config.margin:g} "
                                        f"(lower bound {lo:.3f})", **common)
    if look >= config.max_looks or min(n_s, n_c) >= config.max_samples:
        return Decision(ROLLBACK, reason="not shown non-inferior within the test's looks or samples", **common)
    return Decision(WAIT, reason="not enough evidence either way yet", **common)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _var(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.25  # the largest variance a [0, 1] score can have: no false confidence from 1 sample
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


class Evidence:
    """Responses of the two arms served since the canary began, and their feedback."""

    def __init__(self, record: ServingState, weights: SignalWeights) -> None:
        self.record, self.weights = record, weights
        self.arm_of: dict[str, str] = {}  # response_id -> "stable" | "canary"
        self.requests: defaultdict[str, int] = defaultdict(int)
        self.signals: dict[str, list[float]] = {}  # response_id -> [sum of w*score, sum of w]
        self.pending: list[events_pb2.FeedbackEvent] = []  # feedback that arrived before its response

    def add_inference(self, event: events_pb2.InferenceEvent) -> None:
        if event.timestamp_ms < self.record.canary_since_ms:
            return
        version = int(event.model_version) if event.model_version.isascii() and event.model_version.isdigit() else None
        arm = {self.record.canary: "canary", self.record.serving: "stable"}.get(version)
        if arm is None:
            return
        self.requests[arm] += 1
        for r in event.responses:
            self.arm_of[r.response_id] = arm

    def add_feedback(self, event: events_pb2.FeedbackEvent) -> None:
        scores = response_scores(event, self.weights)
        if any(rid not in self.arm_of for rid, _, _ in scores):
            self.pending.append(event)
            return
        for rid, score, weight in scores:
            acc = self.signals.setdefault(rid, [0.0, 0.0])
            acc[0] += weight * score
            acc[1] += weight

    def retry_pending(self) -> None:
        pending, self.pending = self.pending, []
        for event in pending:
            self.add_feedback(event)
        # Feedback on responses from before the canary (or other versions) never joins: keep a bound.
        self.pending = self.pending[-10_000:]

    def scores(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"stable": [], "canary": []}
        for rid, (total, weight) in self.signals.items():
            if weight > 0:
                out[self.arm_of[rid]].append(total / weight)
        return out


class RolloutController:
    """Reads both topics with its own consumer group, one per canary (from the start of the
    topics, keeping only what was served since the canary began: a restarted controller rebuilds
    its evidence), decides at each look and acts on the serving record."""

    def __init__(self, bus: EventBus, repo: ModelRepository, topics: TopicConfig = TopicConfig(),
                 config: RolloutConfig = RolloutConfig(), weights: SignalWeights = SignalWeights(),
                 report_dir: Path | None = None) -> None:
        self.bus, self.repo, self.topics, self.config, self.weights = bus, repo, topics, config, weights
        self.report_dir = report_dir
        self._trial: tuple[int, int] | None = None  # (canary, since_ms) being judged
        self._consumer = None
        self._evidence: Evidence | None = None
        self._looked_at = 0
        self._looks = 0

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def step(self) -> Decision | None:
        """Reads what is new, looks when due, and acts. None: no canary, or no look due."""
        record, scores = self._gather()
        if record is None:
            return None
        scored = len(scores["stable"]) + len(scores["canary"])
        if min(len(scores["stable"]), len(scores["canary"])) < self.config.min_samples or \
                scored - self._looked_at < self.config.look_every:
            return None
        self._looked_at = scored
        self._looks += 1
        return self._look(record, scores, self._looks)

    def conclude(self) -> Decision | None:
        """A last look now, because the caller's bound on the trial (requests, time) is reached:
        decided as at the test's final look, so a canary not yet shown non-inferior is rolled back.
        None: no canary."""
        record, scores = self._gather()
        if record is None:
            return None
        return self._look(record, scores, self.config.max_looks)

    def _gather(self) -> tuple[ServingState | None, dict[str, list[float]]]:
        record = self.repo.serving_state()
        if record.canary is None:
            self.close()
            self._trial = None
            return None, {}
        if self._trial != (record.canary, record.canary_since_ms):
            self._begin(record)
        self._read()
        return record, self._evidence.scores()

    def _look(self, record: ServingState, scores: dict[str, list[float]], look: int) -> Decision:
        decision = decide(scores["stable"], scores["canary"], look, self.config, record.canary, record.serving)
        decision.canary_requests = self._evidence.requests["canary"]
        decision.decided_at_ms = int(time.time() * 1000)
        if decision.action != WAIT:
            self._act(decision, record)
        self._write(decision)
        return decision

    def _begin(self, record: ServingState) -> None:
        self.close()
        self._trial = (record.canary, record.canary_since_ms)
        self._evidence = Evidence(record, self.weights)
        self._looked_at = self._looks = 0
        group = f"fuseloop-rollout-{record.canary}-{record.canary_since_ms}"
        self._consumer = self.bus.consumer(group, [self.topics.inference, self.topics.feedback])
        self._consumer.join(10.0)  # a fresh group has no partitions until it joins

    def _read(self) -> None:
        evidence = self._evidence
        deadline = time.monotonic() + self.config.read_budget_s
        while time.monotonic() < deadline:  # under live traffic the topics never run dry: bound each step
            records = self._consumer.poll(self.config.poll_records, 0.2)
            if not records:
                break
            for rec in records:
                try:
                    if rec.topic == self.topics.inference:
                        evidence.add_inference(events_pb2.InferenceEvent.FromString(rec.value))
                    elif rec.topic == self.topics.feedback:
                        evidence.add_feedback(events_pb2.FeedbackEvent.FromString(rec.value))
                except Exception:  # the trainer dead-letters malformed events; the judge just skips them
                    continue
        evidence.retry_pending()

    def _act(self, decision: Decision, record: ServingState) -> None:
        if decision.action == PROMOTE:
            change = lambda s: s.deployed(record.canary)  # noqa: E731
        else:
            change = lambda s: s.without_canary()  # noqa: E731
        ServingState.update(self.repo.serving_state_path, change, expect_generation=record.generation)
        log.info("canary %s: %s (%s)", record.canary, decision.action, decision.reason)
        self.close()
        self._trial = None

    def _write(self, decision: Decision) -> None:
        if self.report_dir is None:
            return
        self.report_dir.mkdir(parents=True, exist_ok=True)
        with open(self.report_dir / "rollout-decisions.jsonl", "a") as f:
            f.write(json.dumps(decision.to_dict()) + "\n")
