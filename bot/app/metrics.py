"""Prometheus metrics for one process (prometheus-client), in a registry of their own.

Two kinds: what is read at scrape time from the running parts (the engine's queue and counters, the
state cache, the database file), by a collector; and what is counted as it happens, fed by the core's
turn observers (``ChatService.observers``: each finished turn's platform, outcome, state source,
duration, time to first text) and by the platform calls ``adapters/retry.py`` reports. README,
"Metrics", lists each one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bot.core.service import ChatService, TurnReport
from bot.errors import ConfigError

log = logging.getLogger(__name__)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class PlatformCall(Protocol):
    """What ``adapters.retry`` reports of a platform call attempt (its ``PlatformCall``)."""

    @property
    def platform(self) -> str: ...

    @property
    def result(self) -> str: ...


def database_bytes(path: Path) -> int:
    """The database file with its write-ahead log (what the disk holds for it)."""
    total = 0
    for part in (path, path.with_name(path.name + "-wal")):
        try:
            total += part.stat().st_size
        except OSError:
            pass
    return total


def _thread_counts(backend: object) -> Iterator[Any]:
    """The torch threads a CPU backend's steps run on now, and how often the count changed while
    running (``bot.inference.thread_watch``); nothing for a backend on a GPU or one that does not
    choose them."""
    if getattr(getattr(backend, "device", None), "type", "cpu") != "cpu":
        return
    watch = getattr(backend, "thread_watch", None)
    paths: Any = getattr(backend, "paths", None)
    threads = int(getattr(paths, "threads", 0) or 0)
    if threads:
        batch = threads
        one_stream = int(getattr(paths, "small_step_threads", 0) or 0) or batch
    elif watch is not None:
        one_stream, batch = watch.current
    else:
        return
    counts = GaugeMetricFamily("raven_engine_torch_threads", "Torch threads the model's steps run on, "
                               "by step size (one_stream: under 4 rows)", labels=["steps"])
    counts.add_metric(["one_stream"], one_stream)
    counts.add_metric(["batch"], batch)
    yield counts
    yield CounterMetricFamily("raven_engine_thread_changes", "Torch thread counts changed while running "
                              "because another count ran the steps faster",
                              value=len(watch.changes) if watch is not None else 0)


class _ScrapeTime(Collector):
    """Read at each scrape: nothing is kept between scrapes."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        engine, states = self.service.engine, self.service.states
        stats = engine.stats
        yield GaugeMetricFamily("raven_engine_queue_depth", "Replies and model work waiting for the engine",
                                value=engine.queued)
        yield GaugeMetricFamily("raven_engine_batch_rows", "Replies in the batch now (one row each per decode step)",
                                value=engine.rows)
        yield GaugeMetricFamily("raven_engine_batch_rows_max", "The most rows one decode step has carried",
                                value=stats.max_batch_seen)
        yield GaugeMetricFamily("raven_engine_max_batch", "Rows one decode step can carry (RAVEN_MAX_BATCH)",
                                value=engine.max_batch)
        counters = (
            ("raven_engine_decode_steps", "Decode steps (one token for each row in the batch)", stats.decode_steps),
            ("raven_engine_generated_tokens", "Tokens generated (decoded)", stats.decoded_tokens),
            ("raven_engine_prefilled_tokens", "Prompt tokens read", stats.prefilled_tokens),
            ("raven_engine_step_seconds", "Time spent in decode steps", stats.step_seconds),
            ("raven_engine_busy_rejections", "Replies refused because the queue was full", stats.busy_rejections),
            ("raven_state_cache_evictions", "Thread states dropped from memory for room", states.evictions),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        yield from _thread_counts(engine.backend)
        yield GaugeMetricFamily("raven_state_cache_bytes", "Memory held by cached thread states and prompts",
                                value=states.used_bytes)
        yield GaugeMetricFamily("raven_database_bytes", "The SQLite database file and its write-ahead log",
                                value=database_bytes(self.service.settings.database_path))


class Metrics:
    """The process's metrics. ``attach`` subscribes to the service's turns and the platform calls;
    ``exposition`` is what ``/metrics`` answers."""

    def __init__(self, service: ChatService) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.turns = Counter("raven_turns", "Finished turns by how they ended", ["platform", "outcome"],
                             registry=self.registry)
        self.turn_seconds = Histogram("raven_turn_duration_seconds", "Turn duration, message to last word",
                                      ["platform"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.first_token = Histogram("raven_time_to_first_token_seconds", "Message to the first text shown",
                                     ["platform"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.state_source = Counter("raven_state_source", "Where a turn's starting state came from",
                                    ["source"], registry=self.registry)
        self.turn_tokens = Counter("raven_turn_generated_tokens", "Tokens generated by finished turns",
                                   ["platform"], registry=self.registry)
        self.platform_calls = Counter("raven_platform_calls", "Platform API call attempts by result (ok or code)",
                                      ["platform", "result"], registry=self.registry)
        self.registry.register(_ScrapeTime(service))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- feeding ---------------------------------------------------------------------------------------

    def observe_turn(self, report: TurnReport) -> None:
        self.turns.labels(report.platform, report.outcome).inc()
        self.turn_seconds.labels(report.platform).observe(report.seconds)
        if report.resumed_from is not None:  # the model wrote a reply (not a command's answer)
            self.state_source.labels(report.resumed_from).inc()
            if report.first_text_s is not None:
                self.first_token.labels(report.platform).observe(report.first_text_s)
        if report.generated_tokens:
            self.turn_tokens.labels(report.platform).inc(report.generated_tokens)

    def observe_call(self, call: PlatformCall) -> None:
        self.platform_calls.labels(call.platform, call.result).inc()

    def attach(self) -> Metrics:
        from adapters import retry  # the composition root may know the adapters (lazily)

        self.service.observers.append(self.observe_turn)
        retry.call_observers.append(self.observe_call)
        return self

    def close(self) -> None:
        from adapters import retry

        with_turns, with_calls = self.service.observers, retry.call_observers
        if self.observe_turn in with_turns:
            with_turns.remove(self.observe_turn)
        if self.observe_call in with_calls:
            with_calls.remove(self.observe_call)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- serving ---------------------------------------------------------------------------------------

    async def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type; collected in a thread (the database's size is a
        file system call)."""
        return await asyncio.to_thread(generate_latest, self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int) -> int:
        """prometheus-client's own HTTP server, in a thread (``RAVEN_METRICS_PORT`` without the web
        page); returns the port it listens on."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"RAVEN_METRICS_HOST/RAVEN_METRICS_PORT: cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}") from None
        bound = int(self._server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound
