"""Running rounds on their own: every so often and/or once enough feedback waits on the bus,
until SIGTERM/SIGINT, with Prometheus metrics of what each round did.

A first signal lets the running round finish (its report and store are written as usual), then
stops. A second one abandons the round at once: nothing of it is published, and because offsets
reach the bus only after the store's transaction (see trainer/ingest.py), the restarted trainer
redoes the round with every event counted once, as after a kill -9.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from fuseloop.errors import UserError
from fuseloop.metrics import MetricsRegistry


class RoundAbandoned(Exception):
    """A second stop signal arrived while a round was running."""


@dataclass(frozen=True)
class Schedule:
    every_s: float | None = None  # a round at least this often
    when_feedback: int | None = None  # a round as soon as this many feedback events wait
    check_s: float = 1.0  # how often to look at the bus while waiting
    max_rounds: int | None = None  # None: until a signal


def parse_duration(text: str) -> float:
    """"90" or "90s" -> 90; "10m" -> 600; "2h" -> 7200."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise UserError(f"--every {text!r}: give a duration like 90s, 10m or 2h") from None
    if value <= 0:
        raise UserError(f"--every {text!r}: the duration must be positive")
    return value


class TrainerMetrics:
    """Rounds run, deployed, refused (and why), skipped, and seconds per phase."""

    def __init__(self, metrics: MetricsRegistry) -> None:
        r = metrics.registry
        self.rounds = Counter("fuseloop_trainer_rounds", "rounds finished, by outcome "
                              "(deployed, published, refused, skipped)", ["outcome"], registry=r)
        self.refused = Counter("fuseloop_trainer_refused", "candidates the gate refused, by check "
                               "(reward, eval_set, kl)", ["reason"], registry=r)
        self.abandoned = Counter("fuseloop_trainer_rounds_abandoned", "rounds abandoned on a signal", registry=r)
        self.phase = Histogram("fuseloop_trainer_phase_seconds", "seconds per phase of a round", ["phase"],
                               buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)
        self.pending = Gauge("fuseloop_trainer_pending_feedback", "feedback events waiting on the bus", registry=r)
        self.last_round = Gauge("fuseloop_trainer_last_round", "number of the last finished round", registry=r)
        self.serving_version = Gauge("fuseloop_trainer_published_version", "last version published", registry=r)

    def record(self, report: dict) -> None:
        self.last_round.set(report["round"])
        for phase, seconds in report.get("timings", {}).items():
            self.phase.labels(phase).observe(seconds)
        self.phase.labels("round").observe(report.get("seconds", 0.0))
        if report.get("skipped"):
            outcome = "skipped"
        elif report.get("not_deployed_because"):
            outcome = "refused"
            for reason in report["not_deployed_because"]:
                self.refused.labels(gate_check(reason)).inc()
        elif report.get("deployed"):
            outcome = "deployed"
        else:
            outcome = "published"
        if report.get("version"):
            self.serving_version.set(report["version"])
        self.rounds.labels(outcome).inc()


def gate_check(reason: str) -> str:
    """The gate check a refusal reason names (a bounded label set for Prometheus)."""
    for key, label in (("reward-model", "reward"), ("eval-set", "eval_set"), ("KL", "kl")):
        if reason.startswith(key):
            return label
    return "other"


def pending_feedback(consumer, feedback_topic: str) -> int:
    """Feedback events on the bus the consumer group has not read yet (0 before an assignment)."""
    position, end = consumer.position(), consumer.end_offsets()
    return sum(max(0, e - position.get(tp, e)) for tp, e in end.items() if tp[0] == feedback_topic)


class StopSignals:
    """SIGTERM/SIGINT: the first asks to stop after the round, a second abandons it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.in_round = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.stop.is_set() and self.in_round:
            raise RoundAbandoned(f"round abandoned on a second {signal.Signals(signum).name}")
        self.stop.set()


def run_scheduled(run_round: Callable[[], dict], pending: Callable[[], int], schedule: Schedule,
                  signals: StopSignals, metrics: TrainerMetrics | None = None,
                  on_report: Callable[[dict], None] = lambda r: None, clock=time.monotonic,
                  tick: Callable[[], None] = lambda: None) -> int:
    """Runs rounds as the schedule says until a stop signal (or max_rounds); returns rounds run.
    `tick` runs at every check between rounds (the rollout controller judging a canary)."""
    done, last = 0, clock()
    while not signals.stop.is_set() and (schedule.max_rounds is None or done < schedule.max_rounds):
        tick()
        waiting = pending()
        if metrics is not None:
            metrics.pending.set(waiting)
        due = (schedule.every_s is not None and clock() - last >= schedule.every_s) or \
              (schedule.when_feedback is not None and waiting >= schedule.when_feedback)
        if not due:
            signals.stop.wait(schedule.check_s)
            continue
        last = clock()
        signals.in_round = True
        try:
            report = run_round()
        except RoundAbandoned:
            if metrics is not None:
                metrics.abandoned.inc()
            raise
        finally:
            signals.in_round = False
        done += 1
        if metrics is not None:
            metrics.record(report)
        on_report(report)
    return done
