"""Request checks before any model work: each failure says what was wrong (INVALID_ARGUMENT).

Proto3 cannot tell an unset number from 0, so 0 means "the default" where 0 is not itself a
meaningful value: max_new_tokens 0 -> the limit, top_p 0 -> 1 (no filtering), num_candidates 0 -> 1,
best_of 0 -> no reranking. temperature 0 is meaningful: greedy decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fuseloop.preprocessing import InvalidInput
from fuseloop.v1 import events_pb2, inference_pb2
from services.inference.config import InferenceServiceConfig


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    num_candidates: int
    best_of: int  # sequences sampled; > num_candidates or == with rerank means reranked

    @property
    def rerank(self) -> bool:
        return self.best_of > 0

    @property
    def num_sequences(self) -> int:
        return self.best_of if self.rerank else self.num_candidates

    def sampling_proto(self) -> events_pb2.SamplingParams:
        msg = events_pb2.SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                        top_p=self.top_p)
        if self.seed is not None:
            msg.seed = self.seed
        return msg


def generate_params(request: inference_pb2.GenerateRequest, config: InferenceServiceConfig,
                    model_max_tokens: int) -> GenerateParams:
    s = request.sampling
    limit = min(config.max_new_tokens, model_max_tokens)
    if s.max_new_tokens < 0 or s.max_new_tokens > limit:
        raise InvalidInput(f"sampling.max_new_tokens is {s.max_new_tokens}; it must be 1..{limit} (0 means {limit})")
    if not math.isfinite(s.temperature) or not 0.0 <= s.temperature <= config.max_temperature:
        raise InvalidInput(f"sampling.temperature is {s.temperature}; it must be 0..{config.max_temperature} (0 is greedy)")
    if not math.isfinite(s.top_p) or not 0.0 <= s.top_p <= 1.0:
        raise InvalidInput(f"sampling.top_p is {s.top_p}; it must be in (0, 1] (0 means 1)")
    if request.num_candidates < 0 or request.num_candidates > config.max_num_candidates:
        raise InvalidInput(f"num_candidates is {request.num_candidates}; it must be 1..{config.max_num_candidates}")
    n = request.num_candidates or 1
    if request.best_of and not n <= request.best_of <= config.max_best_of:
        raise InvalidInput(f"best_of is {request.best_of}; it must be 0 (no reranking) or "
                           f"num_candidates..{config.max_best_of}")
    session_bytes = len(request.session_id.encode("utf-8"))
    if session_bytes > config.max_session_id_bytes:
        raise InvalidInput(f"session_id is {session_bytes} bytes; the limit is {config.max_session_id_bytes}")
    return GenerateParams(
        max_new_tokens=s.max_new_tokens or limit,
        temperature=float(s.temperature),
        top_p=float(s.top_p) if s.top_p > 0 else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        num_candidates=n,
        best_of=request.best_of,
    )


def check_text(name: str, text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise InvalidInput(f"{name} is {len(text)} characters; the limit is {max_chars}")
