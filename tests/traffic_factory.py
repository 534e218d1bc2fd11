"""Logged traffic for trainer tests: responses sampled from a checkpoint's policy and feedback
from simulated users, published on a bus exactly as the services publish them (protobuf
payloads keyed by session id)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from demo.simulated_users import Shown, SimulatedUser, UserModel
from fuseloop.bus import EventBus, TopicConfig
from fuseloop.checkpoint import Checkpoint
from fuseloop.events import EVENT_SCHEMA_VERSION, new_id, now_ms
from fuseloop.scenes import GoldOracle, SceneTaskConfig, make_examples, png_bytes, render
from fuseloop.v1 import events_pb2


@dataclass
class PublishedTraffic:
    inference: list[events_pb2.InferenceEvent] = field(default_factory=list)
    feedback: list[events_pb2.FeedbackEvent] = field(default_factory=list)


def publish_traffic(bus: EventBus, topics: TopicConfig, ckpt: Checkpoint, requests: int, seed: int = 0,
                    users: int = 8, app_id: str = "test-app",
                    user_model: UserModel = UserModel(pair_share=0.4)) -> PublishedTraffic:
    pre = ckpt.preprocessor
    rng = random.Random(seed)
    oracle = GoldOracle()
    people = [SimulatedUser(f"user-{i}", user_model, oracle, rng) for i in range(users)]
    task = SceneTaskConfig(image_size=pre.config.image_size)
    examples = make_examples(requests, seed=9_000 + seed, config=task)
    images = [png_bytes(render(e.scene, task)) for e in examples]
    px = torch.from_numpy(pre.images(images))
    ids, mask = (torch.from_numpy(a) for a in pre.prompts([e.prompt for e in examples]))
    gen = torch.Generator().manual_seed(seed)
    tokens, logps = ckpt.family.generate(ckpt.policy, px.repeat(2, 1, 1, 1), ids.repeat(2, 1), mask.repeat(2, 1),
                                         pre.config.max_response_tokens, 1.0, 1.0, gen)
    out = PublishedTraffic()
    for i, example in enumerate(examples):
        user = people[rng.randrange(users)]
        n = 2 if user.wants_pair() else 1
        ev = events_pb2.InferenceEvent(schema_version=EVENT_SCHEMA_VERSION, event_id=new_id(), request_id=new_id(),
                                       model_version="1", prompt=example.prompt, image=images[i], timestamp_ms=now_ms(),
                                       app_id=app_id, session_id=user.session_id)
        shown = []
        for c in range(n):
            row = i + c * requests
            rid = new_id()
            toks = [t for t in tokens[row].tolist() if t != pre.pad_id]
            ev.responses.add(response_id=rid, text=pre.decode(toks), token_ids=toks,
                             token_logprobs=logps[row, : len(toks)].tolist(), display_position=c)
            shown.append(Shown(rid, pre.decode(toks), c))
        bus.publish(topics.inference, user.session_id.encode(), ev.SerializeToString())
        out.inference.append(ev)
        for fb in user.react(example, shown):
            fb.app_id = app_id
            bus.publish(topics.feedback, user.session_id.encode(), fb.SerializeToString())
            out.feedback.append(fb)
    return out
