"""The feedback service over real gRPC: what it accepts, what it refuses and why, and what it writes."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fuseloop.bus import open_bus
from fuseloop.bus.kafka import KafkaBus, KafkaBusConfig
from fuseloop.devkafka import free_port
from fuseloop.v1 import events_pb2 as ev
from fuseloop.v1 import feedback_pb2 as fb
from fuseloop.v1 import feedback_pb2_grpc
from services.feedback.server import SERVICE_NAME, FeedbackServer, FeedbackServiceConfig
from tests.fuzzing import INTS32, INTS64, STRINGS, Outcome, assert_refusals_are_client_errors, mutate_wire, outcome, unknown_field

SECRET = b"test-pseudonym-key-32-bytes-long"
TOKENS = {"token-chat": "chat-app", "token-docs": "docs-app"}
CHAT = [("authorization", "Bearer token-chat")]


def config(topics, **overrides) -> FeedbackServiceConfig:
    return FeedbackServiceConfig(app_tokens=TOKENS, pseudonym_key=SECRET, port=0, topics=topics, **overrides)


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus(request, tmp_path):
    if request.param == "sqlite":
        bus = open_bus(f"sqlite://{tmp_path}/bus.db")
    else:
        bus = open_bus(request.getfixturevalue("local_kafka").url, spool_dir=str(tmp_path / "spool"))
    yield bus
    bus.close()


@pytest.fixture
def sqlite_bus(tmp_path):
    bus = open_bus(f"sqlite://{tmp_path}/bus.db")
    yield bus
    bus.close()


@pytest.fixture
def server(sqlite_bus, fresh_topics):
    with FeedbackServer(config(fresh_topics, max_text_bytes=100, max_batch=5), sqlite_bus) as server:
        yield server


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def stub(channel):
    return feedback_pb2_grpc.FeedbackServiceStub(channel)


def event(event_id: str = "e-1", **fields) -> ev.FeedbackEvent:
    base = dict(event_id=event_id, response_id="resp-1", session_id="sess-1", user_id="alice@example.com", timestamp_ms=1_700_000_000_000)
    if not any(k in fields for k in ("thumbs", "rating", "preference", "correction", "implicit")):
        fields["thumbs"] = ev.Thumbs(up=True)
    return ev.FeedbackEvent(**{**base, **fields})


def published(bus, topics, count: int, timeout_s: float = 20.0) -> list[tuple[bytes, ev.FeedbackEvent]]:
    consumer = bus.consumer("check", [topics.feedback])
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        out += [(r.key, ev.FeedbackEvent.FromString(r.value)) for r in consumer.poll(timeout_s=0.3)]
    extra = consumer.poll(timeout_s=0.2)
    consumer.close()
    return out + [(r.key, ev.FeedbackEvent.FromString(r.value)) for r in extra]


def test_an_accepted_event_is_on_the_bus_stamped_by_the_service(bus, fresh_topics):
    with FeedbackServer(config(fresh_topics), bus) as server, grpc.insecure_channel(server.address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        sent = event(app_id="claims-to-be-another-app", schema_version=0, rating=ev.Rating(stars=4))
        answer = stub.Submit(sent, metadata=CHAT)
        stub.Submit(event("e-2", user_id="alice@example.com"), metadata=CHAT)
        stub.Submit(event("e-3", user_id="alice@example.com"), metadata=[("authorization", "Bearer token-docs")])

    assert answer == fb.SubmitResponse(event_id="e-1", duplicate=False)
    (key, first), (_, second), (_, other_app) = sorted(published(bus, fresh_topics, 3), key=lambda kv: kv[1].event_id)
    assert key == b"sess-1", "keyed by session: a session stays in order"
    assert first.app_id == "chat-app", "the app comes from the token, not from the client"
    assert first.schema_version == 1 and first.rating.stars == 4 and first.timestamp_ms == 1_700_000_000_000
    assert "alice" not in first.user_id and first.user_id.startswith("u_")
    assert second.user_id == first.user_id, "one user, one pseudonym within an app"
    assert other_app.user_id != first.user_id, "pseudonyms cannot be joined across apps"


@pytest.mark.kafka
def test_concurrent_unary_submits_of_one_session_reach_kafka_in_the_order_they_were_acknowledged(
        local_kafka, fresh_topics, tmp_path):
    """Waves of 8 concurrent Submits per session, a wave only after the last one was acknowledged, 4
    sessions at once: every event acked is on the bus, and no event overtakes one acked before it
    was sent (the producer keeps one request in flight: a retry cannot reorder a session)."""
    bus = open_bus(local_kafka.url, spool_dir=str(tmp_path / "spool"))
    sessions, waves, per_wave = 4, 6, 8

    async def session(stub, s: int) -> None:
        for w in range(waves):
            await asyncio.gather(*(stub.Submit(event(f"s{s}-w{w}-{i}", session_id=f"sess-{s}"), metadata=CHAT, timeout=30)
                                   for i in range(per_wave)))

    async def submit_all(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            await asyncio.gather(*(session(stub, s) for s in range(sessions)))

    try:
        with FeedbackServer(config(fresh_topics), bus) as server:
            asyncio.run(submit_all(server.address))
        arrived = published(bus, fresh_topics, sessions * waves * per_wave)
    finally:
        bus.close()
    assert len(arrived) == sessions * waves * per_wave
    for s in range(sessions):
        of_session = [e for key, e in arrived if key == f"sess-{s}".encode()]
        wave_of = [int(e.event_id.split("-w")[1].split("-")[0]) for e in of_session]
        assert len(of_session) == waves * per_wave and wave_of == sorted(wave_of), (s, wave_of)


def test_every_kind_of_feedback_is_accepted(stub):
    kinds = [
        dict(thumbs=ev.Thumbs(up=False)),
        dict(rating=ev.Rating(stars=1)),
        dict(rating=ev.Rating(stars=5)),
        dict(
            response_id="",
            preference=ev.Preference(
                chosen_response_id="r-a", rejected_response_id="r-b", chosen_side=ev.SIDE_RIGHT, rejected_side=ev.SIDE_LEFT
            ),
        ),
        dict(correction=ev.Correction(text="The cat is black, not white.")),
        dict(implicit=ev.Implicit(kind=ev.IMPLICIT_COPY, display_position=1, num_displayed=2)),
        dict(implicit=ev.Implicit(kind=ev.IMPLICIT_DWELL, dwell_ms=5300)),
        dict(implicit=ev.Implicit(kind=ev.IMPLICIT_ABANDON)),
        dict(user_id=""),  # anonymous
    ]
    for i, fields in enumerate(kinds):
        assert not stub.Submit(event(f"kind-{i}", **fields), metadata=CHAT).duplicate


INVALID = [
    (dict(thumbs=None), "unknown feedback kind: no signal set"),
    (dict(implicit=ev.Implicit(kind=ev.IMPLICIT_KIND_UNSPECIFIED)), "unknown implicit.kind IMPLICIT_KIND_UNSPECIFIED"),
    (dict(implicit=ev.Implicit(kind=42)), "unknown implicit.kind 42"),
    (dict(implicit=ev.Implicit(kind=ev.IMPLICIT_DWELL)), "dwell_ms is required"),
    (dict(implicit=ev.Implicit(kind=ev.IMPLICIT_CLICK, dwell_ms=-1)), "dwell_ms must be"),
    (dict(implicit=ev.Implicit(kind=ev.IMPLICIT_CLICK, display_position=3, num_displayed=2)), "outside the 2 responses"),
    (dict(rating=ev.Rating(stars=0)), "rating.stars must be 1..5, got 0"),
    (dict(rating=ev.Rating(stars=6)), "rating.stars must be 1..5, got 6"),
    (dict(correction=ev.Correction(text="x" * 101)), "correction.text is 101 bytes; the limit is 100"),
    (dict(correction=ev.Correction(text="")), "correction.text is empty"),
    (dict(event_id=""), "event_id is missing"),
    (dict(response_id=""), "response_id is missing"),
    (dict(session_id=""), "session_id is missing"),
    (dict(user_id="u" * 300), "user_id is 300 bytes"),
    (dict(timestamp_ms=-5), "timestamp_ms must be"),
    (dict(schema_version=2), "schema_version 2 is not supported"),
    (
        dict(preference=ev.Preference(chosen_response_id="r-a", rejected_response_id="", chosen_side=1, rejected_side=2)),
        "preference.rejected_response_id is missing",
    ),
    (
        dict(preference=ev.Preference(chosen_response_id="r-a", rejected_response_id="r-a", chosen_side=1, rejected_side=2)),
        "are the same response",
    ),
    (
        dict(preference=ev.Preference(chosen_response_id="r-a", rejected_response_id="r-b", chosen_side=1)),
        "preference.rejected_side must be SIDE_LEFT or SIDE_RIGHT, got SIDE_UNSPECIFIED",
    ),
    (
        dict(preference=ev.Preference(chosen_response_id="r-a", rejected_response_id="r-b", chosen_side=2, rejected_side=2)),
        "are the same side",
    ),
]


@pytest.mark.parametrize("fields, message", INVALID, ids=[m for _, m in INVALID])
def test_an_invalid_event_is_refused_with_a_message_saying_what_is_wrong(stub, fields, message):
    bad = event(**{k: v for k, v in fields.items() if v is not None})
    if "thumbs" in fields:
        bad.ClearField("signal")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Submit(bad, metadata=CHAT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()


def test_a_signal_from_a_newer_client_is_refused_as_an_unknown_kind(channel):
    submit = channel.unary_unary(f"/{SERVICE_NAME}/Submit")
    future_kind = event(thumbs=None)
    future_kind.ClearField("signal")
    data = future_kind.SerializeToString() + bytes([15 << 3 | 2, 2, 8, 1])  # field 15: not in this schema
    with pytest.raises(grpc.RpcError) as refused:
        submit(data, metadata=CHAT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown feedback kind" in refused.value.details() and "[15]" in refused.value.details()


@pytest.mark.parametrize("method", ["Submit", "SubmitBatch", "Stream"])
def test_bytes_that_are_not_protobuf_are_refused_and_the_service_keeps_serving(channel, stub, method):
    path = f"/{SERVICE_NAME}/{method}"
    call = channel.stream_unary(path) if method == "Stream" else channel.unary_unary(path)
    garbage = b"\xff\xff\xff\xff not a protobuf"
    with pytest.raises(grpc.RpcError) as refused:
        call(iter([garbage]) if method == "Stream" else garbage, metadata=CHAT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid fuseloop.v1." in refused.value.details()
    assert stub.Submit(event("after-garbage"), metadata=CHAT).event_id == "after-garbage"


@pytest.mark.parametrize(
    "metadata, message",
    [
        ([], "missing `authorization: Bearer <app token>`"),
        ([("authorization", "Bearer not-a-token")], "unknown app token"),
        ([("authorization", "token-chat")], "must be `Bearer <app token>`"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "must be `Bearer <app token>`"),
    ],
)
def test_calls_without_a_known_app_token_are_refused(channel, stub, metadata, message):
    for call in (
        lambda: stub.Submit(event(), metadata=metadata),
        lambda: stub.SubmitBatch(fb.SubmitBatchRequest(events=[event()]), metadata=metadata),
        lambda: stub.Stream(iter([event()]), metadata=metadata),
        lambda: channel.unary_unary(f"/{SERVICE_NAME}/Submit")(b"\xff garbage", metadata=metadata),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert message in refused.value.details()


def test_a_resubmitted_event_is_answered_as_a_duplicate_and_written_once(stub, sqlite_bus, fresh_topics):
    assert stub.Submit(event("once"), metadata=CHAT).duplicate is False
    assert stub.Submit(event("once"), metadata=CHAT).duplicate is True
    batch = fb.SubmitBatchRequest(events=[event("once"), event("twice"), event("twice")])
    assert stub.SubmitBatch(batch, metadata=CHAT) == fb.SubmitBatchResponse(accepted=1, duplicates=2)
    assert stub.Submit(event("once"), metadata=[("authorization", "Bearer token-docs")]).duplicate is False, "ids are per app"
    assert sorted(e.event_id for _, e in published(sqlite_bus, fresh_topics, 3)) == ["once", "once", "twice"]


def test_a_batch_with_one_bad_event_is_refused_whole(stub, sqlite_bus, fresh_topics):
    batch = fb.SubmitBatchRequest(events=[event("b-0"), event("b-1"), event("b-2", rating=ev.Rating(stars=9))])
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitBatch(batch, metadata=CHAT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("events[2]: rating.stars must be 1..5")
    assert published(sqlite_bus, fresh_topics, 0) == []

    too_big = fb.SubmitBatchRequest(events=[event(f"big-{i}") for i in range(6)])
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitBatch(too_big, metadata=CHAT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the batch has 6 events; the limit is 5" in refused.value.details()


def test_a_stream_is_written_in_batches_and_a_bad_event_ends_it_after_keeping_the_ones_before(stub, sqlite_bus, fresh_topics):
    answer = stub.Stream(iter([event(f"s-{i}") for i in range(12)]), metadata=CHAT)  # more than max_batch
    assert answer == fb.SubmitBatchResponse(accepted=12, duplicates=0)

    with pytest.raises(grpc.RpcError) as refused:
        stub.Stream(iter([event("t-0"), event("t-1"), event("t-2", session_id=""), event("t-3")]), metadata=CHAT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event #2 of the stream: session_id is missing" in refused.value.details()
    assert "2 accepted" in refused.value.details()
    ids = {e.event_id for _, e in published(sqlite_bus, fresh_topics, 14)}
    assert {"t-0", "t-1"} <= ids and not {"t-2", "t-3"} & ids and len(ids) == 14


def test_when_the_spool_is_full_the_service_answers_resource_exhausted(tmp_path, fresh_topics):
    kafka_away = KafkaBus(
        KafkaBusConfig(
            f"127.0.0.1:{free_port()}", api_version=(0, 9), send_timeout_s=0.2, spool_dir=str(tmp_path / "spool"), spool_max_bytes=400
        )
    )
    with FeedbackServer(config(fresh_topics), kafka_away) as server, grpc.insecure_channel(server.address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        stub.Submit(event("fits"), metadata=CHAT)  # OK: fsynced to the spool
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitBatch(fb.SubmitBatchRequest(events=[event(f"more-{i}") for i in range(5)]), metadata=CHAT)
        assert server.metrics.registry.get_sample_value("fuseloop_feedback_spooled_events") == 1
    kafka_away.close()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "spool is full" in refused.value.details()


def test_oversized_messages_are_refused_by_the_transport(tmp_path, sqlite_bus, fresh_topics):
    with FeedbackServer(config(fresh_topics, max_message_bytes=10_000), sqlite_bus) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Submit(event(correction=ev.Correction(text="x" * 20_000)), metadata=CHAT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_server_reports_health_and_offers_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert SERVICE_NAME in {s.name for s in answer.list_services_response.service}


def test_the_server_counts_accepted_duplicate_and_refused_calls(server, stub):
    stub.Submit(event("m-1"), metadata=CHAT)
    stub.Submit(event("m-1"), metadata=CHAT)
    stub.Submit(event("m-2", rating=ev.Rating(stars=3)), metadata=CHAT)
    with pytest.raises(grpc.RpcError):
        stub.Submit(event("m-3"), metadata=[("authorization", "Bearer nope")])
    sample = server.metrics.registry.get_sample_value
    assert sample("fuseloop_feedback_events_accepted_total", {"app": "chat-app", "kind": "thumbs"}) == 1
    assert sample("fuseloop_feedback_events_accepted_total", {"app": "chat-app", "kind": "rating"}) == 1
    assert sample("fuseloop_feedback_events_duplicate_total", {"app": "chat-app"}) == 1
    deadline = time.monotonic() + 5  # the server counts a call just after the client has its answer
    while sample("fuseloop_feedback_requests_total", {"method": "Submit", "code": "UNAUTHENTICATED"}) != 1:
        assert time.monotonic() < deadline, "the refused call was not counted"
        time.sleep(0.01)
    assert sample("fuseloop_feedback_requests_total", {"method": "Submit", "code": "OK"}) == 3


# Every field of a FeedbackEvent a client sets, with what a refusal about it must mention.
EVENT_FIELDS = ("schema_version", "event_id", "response_id", "user_id", "session_id", "timestamp_ms", "app_id",
                "thumbs.up", "rating.stars", "preference.chosen_response_id", "preference.rejected_response_id",
                "preference.chosen_side", "preference.rejected_side", "correction.text", "implicit.kind",
                "implicit.dwell_ms", "implicit.display_position", "implicit.num_displayed")


def hostile_event(rng: random.Random, n: int) -> tuple[ev.FeedbackEvent, set[str]]:
    """A valid event of a random kind with 0-3 fields set to hostile values, and the names a refusal may cite."""
    e = event(f"fuzz-{n}", thumbs=None)
    e.ClearField("signal")
    kind = rng.choice(["thumbs", "rating", "preference", "correction", "implicit"])
    if kind == "thumbs":
        e.thumbs.up = True
    elif kind == "rating":
        e.rating.stars = 4
    elif kind == "preference":
        e.response_id = ""
        e.preference.CopyFrom(ev.Preference(chosen_response_id="r-a", rejected_response_id="r-b", chosen_side=1, rejected_side=2))
    elif kind == "correction":
        e.correction.text = "the square"
    else:
        e.implicit.CopyFrom(ev.Implicit(kind=ev.IMPLICIT_DWELL, dwell_ms=900, display_position=0, num_displayed=2))
    names = set()
    for field in rng.sample(EVENT_FIELDS, rng.randint(0, 3)):
        *path, leaf = field.split(".")
        target = e
        for part in path:
            target = getattr(target, part)  # setting a field of another kind switches the oneof to it
        if leaf == "up":
            value = rng.random() < 0.5
        elif leaf in ("schema_version",):
            value = rng.choice([0, 1, 2, 2**32 - 1])
        elif leaf in ("timestamp_ms", "dwell_ms"):
            value = rng.choice(INTS64)
        elif leaf in ("stars", "display_position", "num_displayed", "chosen_side", "rejected_side", "kind"):
            value = rng.choice(INTS32 + [3, 4, 5, 6, 99])  # enums take unknown values too (proto3 keeps them)
        else:
            value = rng.choice(STRINGS + ["r-a", "r-b", "é" * 200])
        setattr(target, leaf, value)
        # Switching the signal's kind changes whether response_id is required.
        names |= {leaf, path[0], "response_id"} if path else {leaf}
    if rng.random() < 0.05:
        e.ClearField("signal")
        names.add("signal")
    return e, names


def names_the_event_field(o: Outcome) -> bool:
    """A refusal says which field was wrong (or that the bytes are no request, or the batch too big)."""
    if o.code == grpc.StatusCode.UNAUTHENTICATED:
        return "app token" in o.details
    if o.code != grpc.StatusCode.INVALID_ARGUMENT:
        return False
    touched = o.what.split("|")[1].split(",")
    named = [n for n in touched if n not in ("wire", "signal", "batch")]
    if "wire" in touched:
        named += [f.rsplit(".", 1)[-1] for f in EVENT_FIELDS] + ["is not a valid", "feedback kind", "the batch has"]
    if "signal" in touched or "wire" in touched:
        named.append("unknown feedback kind")
    if "batch" in touched:
        named.append("the limit is 5 (split it)")
    return any(n in o.details for n in named)


def test_fuzzed_feedback_requests_never_get_unknown_or_internal(server, channel, stub):
    """Seeded Submit and SubmitBatch calls with hostile ids, unicode, negative and huge numbers,
    unknown enum values, unknown oneof cases, duplicate ids, oversized batches, broken bytes, tiny
    deadlines and bad tokens: each answer is OK or a client error naming what was wrong, and the
    service keeps taking valid events."""
    rng = random.Random(7)
    submit = channel.unary_unary(f"/{SERVICE_NAME}/Submit")
    submit_batch = channel.unary_unary(f"/{SERVICE_NAME}/SubmitBatch")
    outcomes = []
    for i in range(600):
        bad_token = rng.choice(["Bearer nope", "", "bearer token-chat", "Bearer  token-chat"])
        metadata = CHAT if rng.random() > 0.03 else [("authorization", bad_token)]
        timeout = 0.001 if rng.random() < 0.03 else 30
        if i % 2:
            e, names = hostile_event(rng, i)
            data = e.SerializeToString()
            method = submit
        else:
            events, names = [], set()
            for j in range(rng.choice([0, 1, 2, 3, 5, 5, 6, 40])):  # the server's max_batch is 5
                e, touched = (events[-1], set()) if events and rng.random() < 0.2 else hostile_event(rng, i * 100 + j)
                events.append(e)  # the repeat is a duplicate event id
                names |= touched
            if len(events) > 5:
                names.add("batch")
            data = fb.SubmitBatchRequest(events=events).SerializeToString()
            method = submit_batch
        if rng.random() < 0.15:
            data, names = mutate_wire(rng, data) if rng.random() < 0.7 else data + unknown_field(rng), names | {"wire"}
        outcomes.append(outcome(f"{'Submit' if i % 2 else 'SubmitBatch'}|{','.join(sorted(names))}",
                                lambda: method(data, metadata=metadata, timeout=timeout)))
    outcomes = [o for o in outcomes if o.code != grpc.StatusCode.DEADLINE_EXCEEDED]
    assert_refusals_are_client_errors(outcomes, names_the_event_field)
    assert {o.code for o in outcomes} >= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert stub.Submit(event("after-the-fuzz"), metadata=CHAT).duplicate is False
