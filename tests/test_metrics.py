"""Prometheus metrics scraped over real HTTP from real servers (the web port's /metrics, and
prometheus-client's own server on RAVEN_METRICS_PORT as ``raven run`` wires it) after real turns of the
real service, store and tiny model; values checked against what the turns and the parts report."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.retry import RetryPolicy, call_observers, call_with_retries
from adapters.web import WebAdapter
from bot.app.assembly import open_service
from bot.app.metrics import Metrics, database_bytes
from bot.core.service import ChatService, TurnReport
from tests.test_web_api import TOKEN, ask, start_adapter, stop

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Summed over the labels not given."""
    return sum(v for (n, have), v in samples.items() if n == name and set(labels.items()) <= have)


async def scrape(http: httpx.AsyncClient, path: str = "/metrics") -> Samples:
    response = await http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@contextlib.asynccontextmanager
async def web_with_metrics(settings: Any) -> AsyncIterator[tuple[ChatService, Metrics, str]]:
    async with open_service(settings) as service:
        metrics = Metrics(service).attach()
        adapter = WebAdapter(service, settings.web, metrics.exposition)
        task = await start_adapter(adapter)
        try:
            yield service, metrics, adapter.url
        finally:
            await stop(task)
            metrics.close()


async def test_web_port_metrics_after_real_turns(settings_factory: Any) -> None:
    async with web_with_metrics(settings_factory(web={"port": 0})) as (service, _, url):
        reports: list[TurnReport] = []
        service.observers.append(reports.append)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            before = await scrape(http)
            assert total(before, "raven_turns_total") == 0
            for text in ("first question", "second question", "third question"):
                assert (await http.post("/generate-response", json=ask(text, persona=None))).status_code == 200
            assert (await http.post("/generate-response", json=ask("/help", persona=None))).status_code == 200
            samples = await scrape(http)

        answered = (value(samples, "raven_turns_total", platform="web", outcome="answered")
                    + value(samples, "raven_turns_total", platform="web", outcome="cut_off"))
        assert answered == 3 and value(samples, "raven_turns_total", platform="web", outcome="command") == 1
        assert total(samples, "raven_turns_total") == 4
        assert value(samples, "raven_time_to_first_token_seconds_count", platform="web") == 3  # replies only
        assert value(samples, "raven_turn_duration_seconds_count", platform="web") == 4
        assert value(samples, "raven_turn_duration_seconds_sum", platform="web") == pytest.approx(
            sum(r.seconds for r in reports))
        assert value(samples, "raven_time_to_first_token_seconds_bucket", platform="web", le="+Inf") == 3
        sources = {r.resumed_from for r in reports if r.resumed_from}
        assert total(samples, "raven_state_source_total") == 3
        assert value(samples, "raven_state_source_total", source="memory") == 2  # the thread's 2nd and 3rd turn
        assert sources <= {"memory", "store", "rebuild", "new"}
        generated = sum(r.generated_tokens for r in reports)
        assert generated > 0 and value(samples, "raven_turn_generated_tokens_total", platform="web") == generated
        stats = service.engine.stats
        assert value(samples, "raven_engine_generated_tokens_total") == stats.decoded_tokens > 0
        assert value(samples, "raven_engine_decode_steps_total") == stats.decode_steps
        assert value(samples, "raven_engine_prefilled_tokens_total") == stats.prefilled_tokens > 0
        assert value(samples, "raven_engine_queue_depth") == 0 == service.engine.queued
        assert value(samples, "raven_engine_batch_rows_max") == stats.max_batch_seen >= 1
        assert value(samples, "raven_engine_batch_rows") == 0 == service.engine.rows  # all finished
        paths = service.engine.backend.paths  # type: ignore[attr-defined]
        assert value(samples, "raven_engine_torch_threads", steps="batch") == paths.threads >= 1
        assert value(samples, "raven_engine_torch_threads", steps="one_stream") == paths.threads_for(1) >= 1
        assert value(samples, "raven_engine_thread_changes_total") == 0
        assert value(samples, "raven_state_cache_bytes") == service.states.used_bytes > 0
        assert value(samples, "raven_state_cache_evictions_total") == service.states.evictions
        size = database_bytes(service.settings.database_path)
        assert value(samples, "raven_database_bytes") == size > 0


async def test_the_package_backends_thread_counts_are_on_the_metrics(settings_factory: Any,
                                                                     tiny_v4_path: Any) -> None:
    """An RWKV-4 model (the package's backend): the counts its thread watch runs the steps on."""
    async with web_with_metrics(settings_factory(model=tiny_v4_path, web={"port": 0})) as (service, _, url), \
            httpx.AsyncClient(base_url=url, timeout=60) as http:
        assert (await http.post("/generate-response", json=ask("hello", persona=None))).status_code == 200
        samples = await scrape(http)
    watch = service.engine.backend.thread_watch  # type: ignore[attr-defined]
    if watch is None:
        pytest.skip("one usable core: there is no thread count to watch")
    one_stream, batch = watch.current
    assert value(samples, "raven_engine_torch_threads", steps="one_stream") == one_stream >= 1
    assert value(samples, "raven_engine_torch_threads", steps="batch") == batch >= 1
    assert value(samples, "raven_engine_thread_changes_total") == len(watch.changes)
    assert ("raven_engine_thread_changes_total", frozenset()) in samples


async def test_the_web_ports_metrics_follow_the_token(settings_factory: Any) -> None:
    async with web_with_metrics(settings_factory(web={"port": 0, "token": TOKEN})) as (_, _, url), \
            httpx.AsyncClient(base_url=url, timeout=60) as http:
        assert (await http.get("/metrics")).status_code == 401
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200 and "raven_engine_queue_depth" in response.text


class PlatformError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def classify(exc: BaseException) -> tuple[int | None, float | None, bool] | None:
    if isinstance(exc, PlatformError):
        return exc.status, None, False
    if isinstance(exc, ConnectionResetError):
        return None, None, True
    return None


async def test_platform_calls_and_errors_by_code_on_the_metrics_port(service: ChatService) -> None:
    metrics = Metrics(service).attach()
    port = metrics.serve("127.0.0.1", 0)
    failures = iter([PlatformError(503), ConnectionResetError(), PlatformError(429)])

    async def flaky() -> str:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return "posted"

    async def forbidden() -> None:
        raise PlatformError(403)

    def broken_observer(call: Any) -> None:
        raise RuntimeError("an observer's bug")

    call_observers.append(broken_observer)  # must not break the call
    try:
        policy = RetryPolicy(budget_s=10, first_backoff_s=0.01, max_backoff_s=0.02)
        assert await call_with_retries(flaky, policy, classify, "discord: posting a reply") == "posted"
        with pytest.raises(PlatformError):
            await call_with_retries(forbidden, policy, classify, "slack: chat.update")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            samples = await scrape(http)
    finally:
        call_observers.remove(broken_observer)
        metrics.close()
    calls = {(dict(labels)["platform"], dict(labels)["result"]): v for (name, labels), v in samples.items()
             if name == "raven_platform_calls_total"}
    assert calls == {("discord", "503"): 1, ("discord", "connection"): 1, ("discord", "429"): 1,
                     ("discord", "ok"): 1, ("slack", "403"): 1}
    assert metrics.observe_call not in call_observers and metrics.observe_turn not in service.observers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(200):
            with contextlib.suppress(httpx.TransportError):
                return await http.get(url)
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing answered at {url}")


async def refused(url: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            await http.get(url)
        except httpx.ConnectError:
            return True
    return False


@pytest.mark.parametrize("web", [False, True], ids=["metrics-port", "web-port"])
async def test_raven_run_serves_metrics_where_the_settings_say(settings_factory: Any, web: bool) -> None:
    """``_serve`` (what ``raven run`` and ``raven web`` run): the web port's /metrics when the page is
    on (and then not the metrics port), else RAVEN_METRICS_PORT; closed again on shutdown."""
    from bot.app.cli import _serve

    metrics_port, web_port = free_port(), free_port()
    settings = settings_factory(metrics_port=metrics_port, web={"enabled": web, "port": web_port})
    stopping = asyncio.Event()
    serving = asyncio.create_task(_serve(settings, stopping))
    served = f"http://127.0.0.1:{web_port if web else metrics_port}/metrics"
    other = f"http://127.0.0.1:{metrics_port if web else web_port}/metrics"
    try:
        response = await wait_for(served)
        assert response.status_code == 200
        assert parse(response.text)[("raven_engine_queue_depth", frozenset())] == 0
        assert await refused(other)
    finally:
        stopping.set()
        await asyncio.wait_for(serving, 60)
    assert await refused(served)


async def test_the_batch_gauge_counts_the_replies_being_written(settings_factory: Any) -> None:
    from bot.events import Event, ThreadKey

    async with open_service(settings_factory(max_reply_tokens=4000, reply_timeout_s=600)) as service:
        metrics = Metrics(service)
        turns = [service.reply(Event(ThreadKey("test", f"g{i}"), "u", "U", "tell me everything")) for i in range(2)]
        for turn in turns:
            await anext(turn)  # both are streaming now
        writing = parse((await metrics.exposition())[0].decode())
        for i in range(2):
            assert service.stop(ThreadKey("test", f"g{i}"))
        await asyncio.gather(*(turn.outcome() for turn in turns))
        done = parse((await metrics.exposition())[0].decode())
        metrics.close()
    assert value(writing, "raven_engine_batch_rows") == 2
    assert value(done, "raven_engine_batch_rows") == 0
