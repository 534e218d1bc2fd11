"""Live traffic: simulated users calling Generate and sending feedback through the real gRPC
APIs, with the app token, on threads of their own until stopped."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from demo.simulated_users import Shown, SimulatedUser, UserModel
from fuseloop.events import SIGNALS
from fuseloop.scenes import GoldOracle, SceneTaskConfig, make_examples, png_bytes, render
from fuseloop.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc


@dataclass
class TrafficWindow:
    """What happened since the window opened."""

    requests: int = 0
    errors: int = 0
    correct: int = 0  # answers shown that the oracle accepts (the first shown, sampled at T=1)
    latencies_ms: list[float] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SIGNALS})

    def summary(self) -> dict:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([float("nan")])
        return {"requests": self.requests, "errors": self.errors,
                "live_accuracy": self.correct / self.requests if self.requests else float("nan"),
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "events": dict(self.events)}


class Traffic:
    def __init__(self, inference_addr: str, feedback_addr: str, app_token: str, users: int, model: UserModel,
                 task: SceneTaskConfig = SceneTaskConfig(), seed: int = 0) -> None:
        self.inference_addr, self.feedback_addr, self.app_token = inference_addr, feedback_addr, app_token
        self.n_users, self.model, self.task, self.seed = users, model, task, seed
        self.window = TrafficWindow()
        self.think_s = 0.0  # pause between a user's requests; raised while training to leave it the CPU
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "Traffic":
        for i in range(self.n_users):
            t = threading.Thread(target=self._user_loop, args=(i,), name=f"user-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def take_window(self) -> TrafficWindow:
        with self._lock:
            w, self.window = self.window, TrafficWindow()
        return w

    def requests_so_far(self) -> int:
        with self._lock:
            return self.window.requests

    def _user_loop(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        user = SimulatedUser(f"user-{i}", self.model, GoldOracle(), rng)
        examples = make_examples(50_000, seed=7_000_000 + 1000 * self.seed + i, config=self.task)
        auth = [("authorization", f"Bearer {self.app_token}")]
        with grpc.insecure_channel(self.inference_addr) as ich, grpc.insecure_channel(self.feedback_addr) as fch:
            infer = inference_pb2_grpc.InferenceServiceStub(ich)
            feedback = feedback_pb2_grpc.FeedbackServiceStub(fch)
            for k, example in enumerate(examples):
                if self._stop.is_set():
                    return
                if k and k % self.model.session_requests == 0:
                    user.new_session()
                n = 2 if user.wants_pair() else 1
                request = inference_pb2.GenerateRequest(
                    image=png_bytes(render(example.scene, self.task)), prompt=example.prompt, num_candidates=n,
                    sampling=events_pb2.SamplingParams(max_new_tokens=32, temperature=1.0, top_p=1.0),
                    session_id=user.session_id)
                t0 = time.perf_counter()
                try:
                    reply = infer.Generate(request, timeout=30)
                except grpc.RpcError:
                    with self._lock:
                        self.window.errors += 1
                    continue
                latency = (time.perf_counter() - t0) * 1000
                # Candidates come back in display order (the service randomizes it).
                shown = [Shown(c.response_id, c.text, pos) for pos, c in enumerate(reply.candidates)]
                events = user.react(example, shown)
                try:
                    feedback.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=events), timeout=30, metadata=auth)
                except grpc.RpcError:
                    with self._lock:
                        self.window.errors += 1
                    continue
                with self._lock:
                    w = self.window
                    w.requests += 1
                    w.correct += int(GoldOracle().correct(example, shown[0].text))
                    w.latencies_ms.append(latency)
                    for ev in events:
                        w.events[ev.WhichOneof("signal")] += 1
                if self.think_s:
                    self._stop.wait(self.think_s)
