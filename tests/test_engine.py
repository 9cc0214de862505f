"""The engine's scheduler: continuous batching, bounded prefill, busy and timeout, a free event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from bot.app.assembly import load_backend, open_service
from bot.core.outcomes import Busy, CutOff
from bot.errors import EngineBusy
from bot.events import Event, ThreadKey
from bot.inference.engine import Completion, Engine, GenerateRequest, ModelState
from bot.inference.sampling import SamplingParams
from bot.inference.tokenizer import load_tokenizer
from tests.conftest import SettingsFactory


@pytest.fixture
async def engine(settings_factory: SettingsFactory) -> AsyncIterator[Engine]:
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=4, prefill_chunk=32,
                      max_queue=2, reply_timeout_s=30) as running:
        yield running


def request(engine: Engine, start: ModelState, text: str, max_tokens: int, seed: int = 1) -> GenerateRequest:
    tokenizer = engine.tokenizer
    return GenerateRequest(
        start=start, prompt_tokens=tokenizer.encode(f"User: {text}\n\nAssistant:"),
        sampling=SamplingParams(max_tokens=max_tokens), stop_strings=["\n\n"], seed=seed,
    )


async def collect(generation) -> tuple[str, Completion, float]:  # type: ignore[no-untyped-def]
    text = "".join([chunk async for chunk in generation])
    completion = await generation.result()
    return text, completion, time.monotonic()


async def test_a_short_reply_queued_behind_a_long_one_finishes_first(engine: Engine) -> None:
    start = engine.zero_state()
    long = engine.generate(request(engine, start, "write a long essay", max_tokens=150))
    await asyncio.sleep(0.05)
    short = engine.generate(request(engine, start, "say hi", max_tokens=5))
    (long_text, long_done, long_at), (short_text, short_done, short_at) = await asyncio.gather(
        collect(long), collect(short))
    assert short_at < long_at
    assert (short_done.generated_tokens, long_done.generated_tokens) == (5, 150)
    assert long_done.finish_reason == short_done.finish_reason == "length"
    assert engine.stats.max_batch_seen == 2  # they were decoded in the same steps
    assert long_text == long_done.text and short_text == short_done.text


async def test_prefill_is_bounded_per_step_and_streaming_continues(engine: Engine) -> None:
    start = engine.zero_state()
    streaming = engine.generate(request(engine, start, "hello", max_tokens=60))
    first_chunk = await streaming.__aiter__().__anext__()
    assert first_chunk
    long_prompt = " ".join(f"word{i}" for i in range(400))
    reader = engine.generate(request(engine, start, long_prompt, max_tokens=3))
    steps_before = engine.stats.decode_steps
    _, done, _ = await collect(reader)
    assert done.generated_tokens == 3
    assert max(engine.stats.prefill_sizes) <= 32
    # While the long prompt was read in 32-token pieces, the streaming reply kept decoding.
    assert engine.stats.decode_steps - steps_before >= len(long_prompt.split()) // 32
    await streaming.result()


async def test_a_full_queue_answers_busy(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=1, max_queue=1) as engine:
        start = engine.zero_state()
        first = engine.generate(request(engine, start, "one", max_tokens=200))
        await first.__aiter__().__anext__()  # streaming: it holds the only place
        second = engine.generate(request(engine, start, "two", max_tokens=3))
        with pytest.raises(EngineBusy) as busy:
            engine.generate(request(engine, start, "three", max_tokens=3))
        assert busy.value.ahead == 2 and "2 ahead of you" in str(busy.value)
        first.cancel()
        assert (await first.result()).finish_reason == "cancelled"
        assert (await second.result()).generated_tokens == 3


async def test_prefill_jobs_count_toward_the_queue_and_are_refused_when_it_is_full(engine: Engine) -> None:
    import threading

    start = engine.zero_state()
    tokens = engine.tokenizer.encode("System: a persona prompt\n\n")
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:  # keeps the worker busy, so submitted work stays queued
        entered.set()
        gate.wait(30)

    held = asyncio.create_task(engine.call(hold))
    try:
        assert await asyncio.to_thread(entered.wait, 30)  # the worker is inside the call
        first = asyncio.create_task(engine.prefill(start, tokens))
        second = asyncio.create_task(engine.prefill(start, tokens[:-1]))
        await asyncio.sleep(0.01)  # both are submitted
        assert engine.queued == 2 == engine.max_queue
        with pytest.raises(EngineBusy) as busy:
            await engine.prefill(start, tokens)
        assert busy.value.ahead == 2 and "2 ahead of you" in str(busy.value)
        with pytest.raises(EngineBusy) as busy:  # a fresh-state prefill is refused before any work
            await engine.prefill(None, tokens)
        assert busy.value.ahead == 2
        with pytest.raises(EngineBusy):  # queued prefill jobs hold places a reply would need
            engine.generate(request(engine, start, "hi", max_tokens=3))
        assert engine.stats.busy_rejections == 3
        assert (await engine.prefill(start, [])) is start  # nothing to read: no place needed
    finally:
        gate.set()
    await held
    done = await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    assert [d.token_count for d in done] == [len(tokens), len(tokens) - 1]
    assert engine.queued == 0
    again = await engine.prefill(start, tokens)  # room again; the same tokens give the same state
    assert torch.equal(again.logits, done[0].logits)


async def test_busy_reaches_the_user_as_a_notice(settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory(max_batch=1, max_queue=1, max_reply_tokens=300)) as service:
        async def say(thread: str) -> str:
            turn = service.reply(Event(ThreadKey("t", thread), "u", "U", "hi"))
            shown = await turn.text()
            outcome = await turn.outcome()
            return outcome.message if isinstance(outcome, Busy) else shown

        stream = service.reply(Event(ThreadKey("t", "a"), "u", "U", "hi"))
        await stream.__anext__()  # "a" is streaming and holds the only place
        first = asyncio.create_task(_drain(stream))
        second = asyncio.create_task(say("b"))
        await asyncio.sleep(0.2)
        third = await say("c")
        assert "busy" in third and "ahead of you" in third
        messages = await service.thread_messages(ThreadKey("t", "c"))
        assert [(m.role, m.status) for m in messages] == [("user", "failed")]  # kept, marked
        await asyncio.gather(first, second)


async def test_a_reply_that_runs_too_long_ends_with_a_notice(settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory(reply_timeout_s=0.5, max_reply_tokens=5000)) as service:
        key = ThreadKey("t", "slow")
        turn = service.reply(Event(key, "u", "U", "go on forever"))
        reply = await turn.text()
        outcome = await turn.outcome()
        assert isinstance(outcome, CutOff) and outcome.reason == "timeout" and outcome.text == reply
        assert "reply cut off" in outcome.message and "0.5 s" in outcome.message
        turn = service.last_turn(key)
        assert turn is not None and turn.finish_reason == "timeout" and turn.generated_tokens < 5000
        messages = await service.thread_messages(key)
        assert messages[-1].role == "assistant" and "cut off" not in messages[-1].text


async def test_the_event_loop_stays_responsive_while_generating(service) -> None:  # type: ignore[no-untyped-def]
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    replies = await asyncio.gather(*[
        _drain(service.reply(Event(ThreadKey("t", f"par{i}"), "u", "U", "hello " * 50))) for i in range(4)
    ])
    stop.set()
    await tick
    assert all(replies)
    assert len(gaps) > 20
    # Generous for a loaded 2-core CI machine: the model runs in the worker thread, so the loop is
    # only ever delayed by the GIL, not by a model step (~tens of ms).
    assert max(gaps) < 0.25, max(gaps)


async def _drain(stream: AsyncIterator[str]) -> str:
    return "".join([c async for c in stream])


async def test_states_past_the_memory_budget_come_back_from_sqlite_identically(
    settings_factory: SettingsFactory,
) -> None:
    async with open_service(settings_factory(state_cache_mb=1)) as service:
        keys = [ThreadKey("t", f"mem{i}") for i in range(5)]
        before: dict[ThreadKey, ModelState] = {}
        for key in keys:
            await _drain(service.reply(Event(key, "u", "U", f"hello {key.thread_id}")))
            cached = service.states.get(key)
            assert cached is not None
            before[key] = cached.model
        assert service.states.evictions > 0
        assert service.states.used_bytes <= 1024 * 1024
        evicted = [key for key in keys if key not in service.states]
        assert evicted
        key = evicted[0]
        stored = await service.store.load_state(key)
        assert stored is not None
        loaded = await service.engine.decode_state(stored.blob)
        assert torch.equal(loaded.logits, before[key].logits)
        for a, b in zip(loaded.state, before[key].state, strict=True):
            assert torch.equal(a, b)
        await _drain(service.reply(Event(key, "u", "U", "and again")))
        assert service.last_turn(key).resumed_from == "store"  # type: ignore[union-attr]


def test_engine_refuses_a_backend_without_room(tiny_v7_path: Path) -> None:
    from bot.inference.package_backend import PackageBackend

    backend = PackageBackend(tiny_v7_path, max_slots=4)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(backend, load_tokenizer("rwkv_vocab_v20230424"), max_batch=4)


async def test_the_sampling_kernel_is_ready_before_the_engine_serves(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba holds the GIL while it loads a kernel (a 200 ms loop stall in a benchmark run when the
    worker did it): entering the engine does it, off the event loop, before anything is served, in a
    thread that ends."""
    import threading

    from bot.inference import engine as engine_module

    loop_thread = threading.current_thread()
    calls: list[threading.Thread] = []  # the thread of each call

    def check() -> bool:
        calls.append(threading.current_thread())
        return True

    monkeypatch.setattr(engine_module, "nucleus_works", check)
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=2) as running:
        # Done when entered, neither on the loop's thread nor left to the worker's first step.
        assert calls and calls[0] is not loop_thread and calls[0].name != "raven-engine"
        calls[0].join(timeout=5)  # a thread that ends (an executor's would keep an OpenMP team)
        assert not calls[0].is_alive()
        assert running.rows == 0


async def test_tensor_work_runs_in_the_worker_thread(engine: Engine) -> None:
    import threading

    assert await engine.call(lambda: threading.current_thread().name) == "raven-engine"

    def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await engine.call(broken)
    assert await engine.call(lambda: 2 + 2) == 4  # the worker survived the failed call


@pytest.mark.parametrize("backend_name", ["batched", "package"])
def test_prefill_rows_equals_prefilling_each_row(tiny_v7_path: Path, backend_name: str) -> None:
    from bot.inference.package_backend import PackageBackend
    from bot.inference.rwkv7_batched import BatchedRWKV7Backend

    backend = (BatchedRWKV7Backend(tiny_v7_path, max_slots=8) if backend_name == "batched"
               else PackageBackend(tiny_v7_path, max_slots=8))
    rows = [[11, 22, 33, 44, 55], [5, 4, 3, 2, 1], [100, 200, 300, 400, 500]]
    for slot in range(3):
        backend.load_slot(slot, backend.zero_state())
    together = backend.prefill_rows(0, rows)
    for slot, row in enumerate(rows):
        backend.load_slot(4, backend.zero_state())
        alone = backend.prefill(4, row)
        assert (together[slot] - alone).abs().max().item() <= 1e-4
        for a, b in zip(backend.read_slot(slot), backend.read_slot(4), strict=True):
            assert (a.float() - b.float()).abs().max().item() <= 1e-4
    if backend_name == "batched":
        with pytest.raises(ValueError, match="one non-zero length"):
            backend.prefill_rows(0, [[1, 2], [3]])


async def test_prompts_arriving_together_share_one_prefill(engine: Engine) -> None:
    start = engine.zero_state()
    texts = ["first question here", "and a second, longer question for the model"]  # (max_queue is 2)
    generations = [engine.generate(request(engine, start, t, max_tokens=4, seed=i)) for i, t in enumerate(texts)]
    together = [await collect(g) for g in generations]
    assert all(done.generated_tokens == 4 for _, done, _ in together)
    shortest = min(len(engine.tokenizer.encode(f"User: {t}\n\nAssistant:")) for t in texts)
    assert shortest * len(texts) in engine.stats.prefill_sizes  # one multi-row prefill of the common part
    # the same seeds alone give the same replies
    for i, text in enumerate(texts):
        _, alone, _ = await collect(engine.generate(request(engine, start, text, max_tokens=4, seed=i)))
        assert alone.text == together[i][1].text


async def test_a_cancelled_neighbour_never_holds_up_a_waiting_prompt(engine: Engine) -> None:
    start = engine.zero_state()
    first = engine.generate(request(engine, start, "hello", max_tokens=3, seed=1))
    second = engine.generate(request(engine, start, "there", max_tokens=3, seed=2))
    second.cancel()
    _, done, _ = await asyncio.wait_for(collect(first), timeout=30)
    assert done.generated_tokens == 3
    assert (await asyncio.wait_for(second.result(), timeout=30)).finish_reason in ("cancelled", "length")


async def test_a_failing_model_step_ends_the_replies_in_flight_and_the_engine_goes_on(engine: Engine) -> None:
    from bot.errors import RavenError

    start = engine.zero_state()
    real_decode = engine.backend.decode
    failures = iter([RuntimeError("CUDA out of memory (simulated)")])

    def flaky(tokens):  # type: ignore[no-untyped-def]
        for error in failures:
            raise error
        return real_decode(tokens)

    engine.backend.decode = flaky  # type: ignore[method-assign]
    doomed = engine.generate(request(engine, start, "first", max_tokens=20))
    with pytest.raises(RavenError, match="the model failed: CUDA out of memory"):
        await asyncio.wait_for(collect(doomed), timeout=30)
    _, done, _ = await asyncio.wait_for(collect(engine.generate(request(engine, start, "again", max_tokens=3))), 30)
    assert done.generated_tokens == 3 and done.final is not None


async def test_a_message_arriving_in_a_busy_batch_streams_after_one_step(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=8, prefill_chunk=64,
                      max_queue=8, reply_timeout_s=30) as engine:
        start = engine.zero_state()
        busy = [engine.generate(request(engine, start, f"keep talking {i}", max_tokens=80, seed=i))
                for i in range(5)]
        for generation in busy:  # all of them are streaming
            await generation.__aiter__().__anext__()
        text = "a question of twenty or so tokens, which the model reads before answering"
        newcomer = engine.generate(request(engine, start, text, max_tokens=3, seed=9))
        submitted_at = engine.stats.decode_steps
        await newcomer.__aiter__().__anext__()
        # Its whole prompt is read in the step that admits it (not one token per step), so its first
        # token follows within a step or two, however long the prompt.
        prompt_tokens = len(engine.tokenizer.encode(f"User: {text}\n\nAssistant:"))
        assert prompt_tokens > 10
        assert engine.stats.decode_steps - submitted_at <= 2
        assert prompt_tokens in engine.stats.prefill_sizes
        for generation in [*busy, newcomer]:
            await generation.result()


def greedy_request(engine: Engine, start: ModelState, text: str, stops: list[str]) -> GenerateRequest:
    return GenerateRequest(
        start=start, prompt_tokens=engine.tokenizer.encode(f"User: {text}\n\nAssistant:"),
        sampling=SamplingParams(temperature=0, max_tokens=40), stop_strings=stops, seed=1,
    )


async def test_a_stop_string_is_found_wherever_it_falls_and_nothing_past_it_streams(
        settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=8, max_queue=64) as engine:
        start = engine.zero_state()
        free_text, free, _ = await collect(engine.generate(greedy_request(engine, start, "tell me more", [])))
        assert free.generated_tokens == 40 and len(free_text) > 30
        # Stop strings cut from the greedy reply itself at every position of its first 24 characters
        # (so some end one character into a token, some deep inside one, some span two), and one that
        # never occurs. The same greedy reply with each must end just before the stop's first occurrence.
        stops = [free_text[p:p + size] for p in range(24) for size in (1, 5)] + ["\x07never"]
        runs = await asyncio.gather(*(collect(engine.generate(greedy_request(engine, start, "tell me more", [stop])))
                                      for stop in stops))
    for stop, (text, done, _) in zip(stops, runs, strict=True):
        cut = free_text.find(stop)
        expected = free_text if cut < 0 else free_text[:cut]
        assert (text, done.text) == (expected, expected), stop
        assert done.finish_reason == ("length" if cut < 0 else "stop")


async def test_a_step_wakes_the_event_loop_once_not_once_per_reply(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    loop = asyncio.get_running_loop()
    calls = 0
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=4, max_queue=8) as engine:
        start = engine.zero_state()
        prompts = [engine.tokenizer.encode(f"User: hi {i}\n\nAssistant:") for i in range(4)]
        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        replies = await asyncio.gather(*(collect(engine.generate(GenerateRequest(
            start=start, prompt_tokens=prompt, sampling=SamplingParams(max_tokens=30), stop_strings=[],
            seed=i))) for i, prompt in enumerate(prompts)))
        monkeypatch.undo()
        steps = engine.stats.decode_steps
    chunks = sum(done.generated_tokens for _, done, _ in replies)
    assert chunks > 60 and steps < chunks
    # Per step at most: the admitted replies' first tokens, then the decode step's tokens and endings.
    assert calls <= 2 * steps + 2


async def test_a_reply_whose_event_loop_has_closed_never_stops_the_engine(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=2, max_queue=4) as engine:
        start = engine.zero_state()

        def on_another_loop() -> None:  # a caller that goes away while its reply still streams
            loop = asyncio.new_event_loop()

            async def begin() -> None:
                generation = engine.generate(GenerateRequest(
                    start=start, prompt_tokens=engine.tokenizer.encode("User: hi\n\nAssistant:"),
                    sampling=SamplingParams(max_tokens=40), stop_strings=[], seed=1))
                await generation.__aiter__().__anext__()

            loop.run_until_complete(begin())
            loop.close()

        await asyncio.to_thread(on_another_loop)
        _, done, _ = await collect(engine.generate(request(engine, start, "again", max_tokens=3)))
        assert done.generated_tokens == 3 and done.final is not None
