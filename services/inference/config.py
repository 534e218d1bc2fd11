"""Every knob and limit of the inference service, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from fuseloop.bus import TopicConfig
from fuseloop.tls import TlsConfig


@dataclass
class InferenceServiceConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: not served (0: any free port)
    admin_token: str | None = None  # None: the admin API refuses every call
    topics: TopicConfig = field(default_factory=TopicConfig)
    tls: TlsConfig | None = None  # None: plaintext (terminate TLS in front of the service)

    # Batching. Generation batches at decode-step granularity; max_batch caps the sequences
    # decoded together (candidates count one each), max_queue the requests waiting to join.
    max_batch: int = 32
    max_queue_delay_ms: float = 2.0  # how long an idle engine waits for requests already on their way
    max_queue: int = 256
    score_max_batch: int = 32
    score_max_queue_delay_ms: float = 2.0
    score_max_queue: int = 256
    # KServe ModelInfer batches as each model's config.pbtxt says (max_batch_size,
    # dynamic_batching.max_queue_delay_microseconds); this caps the requests waiting per model.
    kserve_max_queue: int = 256

    # Request limits (INVALID_ARGUMENT past them). Token limits also obey the model's own.
    max_message_bytes: int = 5 * 1024 * 1024
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 2000
    max_response_chars: int = 4000
    max_session_id_bytes: int = 256  # the feedback service's id limit: a longer session could never join its feedback
    max_num_candidates: int = 8
    max_best_of: int = 16
    max_new_tokens: int = 64  # capped again by the model's max_response_tokens
    max_temperature: float = 5.0
    inline_decode_max_image_bytes: int = 64 * 1024  # larger images are decoded off the event loop

    # Inference events.
    event_image_max_bytes: int = 256 * 1024  # inlined up to this size; the sha256 is always sent
    max_pending_events: int = 10_000  # beyond this, events are dropped (and counted) rather than queued

    engine_restarts: int = 3  # new generation engine processes after one dies, in the server's life
    shutdown_grace_s: float = 5.0
    serving_record_watch_s: float = 0.5  # how often a replica looks at the fleet's serving record
    worker_threads: int = 4  # preprocessing of large images, model loads, KServe inference, bus writes

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.score_max_batch < 1:
            raise ValueError("max_batch and score_max_batch must be at least 1")
        if self.max_num_candidates < 1 or self.max_best_of < self.max_num_candidates:
            raise ValueError("need 1 <= max_num_candidates <= max_best_of")
