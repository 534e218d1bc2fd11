"""`fuseloop bench feedback` runs end to end and reports every row next to its baseline (numbers not judged)."""

import pytest

from services.feedback.bench import FeedbackBenchConfig, measure


@pytest.mark.kafka
@pytest.mark.slow
def test_the_feedback_benchmark_reports_the_service_next_to_the_raw_producer(local_kafka, tmp_path):
    rows = {r["path"]: r for r in measure(FeedbackBenchConfig(seconds=0.3, rounds=1), local_kafka, tmp_path, progress=lambda *_: None)}

    batch = rows["gRPC SubmitBatch(100) x4 -> Kafka"]
    unary = rows["gRPC Submit x32 -> Kafka"]
    assert batch["baseline"] == "raw kafka-python producer, pipelined"
    assert unary["baseline"] == "raw kafka-python producer, 32 in flight"
    for row in rows.values():
        assert row["events"] > 0 and row["events_per_s"] > 0
        assert row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert batch["vs_raw"] == pytest.approx(batch["events_per_s"] / rows[batch["baseline"]]["events_per_s"], rel=1e-2)
