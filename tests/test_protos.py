"""The committed gRPC stubs are exactly what the pinned grpcio-tools makes from proto/."""

from pathlib import Path

from fuseloop.protos import ROOT, generate


def test_committed_stubs_match_the_protos_and_the_pinned_protoc(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for f in fresh:
        rel = f.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed: run `make protos`"
        assert committed.read_bytes() == f.read_bytes(), f"{rel} drifted from proto/: run `make protos`"


def test_stubs_import_under_the_installed_protobuf():
    from fuseloop.v1 import admin_pb2_grpc, events_pb2, feedback_pb2_grpc, inference_pb2_grpc  # noqa: F401

    assert events_pb2.FeedbackEvent(event_id="e").event_id == "e"
