"""Retries with backoff under one deadline, shared by the sync and the asyncio client. Which calls are
retried, and why this is not gRPC's retry service config: streamrec.clients.client's docstring."""
from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import grpc

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter. The n-th retry waits min(max_backoff, initial * multiplier**(n-1)),
    scaled by a random factor in [1 - jitter, 1]. The call's deadline bounds all attempts together."""

    max_attempts: int = 5  # the first attempt included; 1 = no retries
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retryable_codes: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE})

    def delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, retry_number - 1))
        return base * (1.0 - self.jitter * (rng or random).random())

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        code = error.code() if isinstance(error, grpc.RpcError) and hasattr(error, "code") else None
        return code in self.retryable_codes and attempt < self.max_attempts


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()

# Calls that are safe to repeat. Event sends are: the server applies an event_id at most once.
IDEMPOTENT_METHODS = frozenset({"Recommend", "RecommendBatch", "SimilarItems", "GetItem", "GetUser", "Stats",
                                "Check", "PublishEvents", "StreamEvents"})


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _backoff_or_raise(policy: RetryPolicy, error: BaseException, attempt: int, deadline: float | None) -> float:
    """The delay before the next attempt; re-raises `error` when no retry is allowed or time is short."""
    if not policy.should_retry(error, attempt):
        raise error
    delay = policy.delay(attempt)
    if deadline is not None and time.monotonic() + delay >= deadline:
        raise error
    return delay


def call_with_retry(attempt_fn: Callable[[float | None], T], policy: RetryPolicy, deadline: float | None,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """Run attempt_fn(remaining_timeout_s) until it succeeds, fails with a code the policy does not retry,
    runs out of attempts, or the next backoff would pass the deadline (then the last error is raised)."""
    for attempt in itertools.count(1):
        try:
            return attempt_fn(_remaining(deadline))
        except grpc.RpcError as error:
            sleep(_backoff_or_raise(policy, error, attempt, deadline))
    raise AssertionError("unreachable")
