"""The engine's API for the chat core: states to bytes and back in the worker, the model's vocabulary,
and the helper that runs blocking tensor work in a thread of its own."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from bot.app.assembly import load_backend
from bot.errors import StateError
from bot.inference import state_codec
from bot.inference.engine import Engine, GenerateRequest, ModelState
from bot.inference.package_backend import PackageBackend
from bot.inference.sampling import SamplingParams
from bot.inference.threads import in_fresh_thread, run_in_fresh_thread
from bot.inference.tokenizer import load_tokenizer
from tests.conftest import SettingsFactory


@pytest.fixture
async def engine(settings_factory: SettingsFactory) -> AsyncIterator[Engine]:
    settings = settings_factory()
    assert settings.model is not None
    backend = load_backend(settings, settings.model)
    async with Engine(backend, load_tokenizer(settings.tokenizer), max_batch=2, max_queue=4) as running:
        yield running


async def _some_state(engine: Engine) -> ModelState:
    return await engine.prefill(None, engine.tokenizer.encode("User: hello there\n\nAssistant: hi"))


def _blob(state: list[torch.Tensor], logits: torch.Tensor, token_count: int = 3) -> bytes:
    return state_codec.encode_state(ModelState(state, logits, token_count))


async def test_a_state_encoded_and_decoded_through_the_engine_is_the_same_state(engine: Engine) -> None:
    model = await _some_state(engine)
    assert model.token_count > 5 and float(model.logits.abs().sum()) > 0
    blob = await engine.encode_state(model)
    assert isinstance(blob, bytes) and blob
    back = await engine.decode_state(blob)
    assert back.token_count == model.token_count
    assert torch.equal(back.logits, model.logits)
    assert len(back.state) == len(model.state)
    for got, want in zip(back.state, model.state, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    template = engine._template
    assert template is not None  # made once, in the worker, and kept
    await engine.decode_state(blob)
    assert engine._template is template
    # the decoded state continues the model exactly as the original does
    tokens = engine.tokenizer.encode(" and more")
    a, b = await engine.prefill(model, tokens), await engine.prefill(back, tokens)
    assert torch.equal(a.logits, b.logits)


def _wrong_shape(state: list[torch.Tensor], logits: torch.Tensor) -> bytes:
    return _blob([state[0][:-1], *state[1:]], logits)


def _nan(state: list[torch.Tensor], logits: torch.Tensor) -> bytes:
    bad = state[1].clone()
    bad.view(-1)[0] = float("nan")
    return _blob([state[0], bad, *state[2:]], logits)


def _wrong_vocab(state: list[torch.Tensor], logits: torch.Tensor) -> bytes:
    return _blob(state, logits[:-1])


def _not_a_dict(state: list[torch.Tensor], logits: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save([state, logits], buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(("make", "message"), [
    (lambda state, logits: b"definitely not a torch file", "unreadable"),
    (lambda state, logits: b"", "unreadable"),
    (_not_a_dict, "wrong structure"),
    (_wrong_shape, "state tensor 0 has the wrong shape"),
    (_nan, "state tensor 1 holds NaN"),
    (_wrong_vocab, "logits have the wrong shape"),
], ids=["garbage", "empty", "structure", "shape", "nan", "vocab"])
async def test_a_blob_that_does_not_fit_the_model_raises_state_error(engine: Engine, make, message: str) -> None:  # type: ignore[no-untyped-def]
    model = await _some_state(engine)
    with pytest.raises(StateError, match=message):
        await engine.decode_state(make(model.state, model.logits))
    assert len((await engine.decode_state(await engine.encode_state(model))).state) == len(model.state)


async def test_a_state_of_another_model_raises_state_error(engine: Engine, tiny_v4_path: Path) -> None:
    other = PackageBackend(tiny_v4_path, max_slots=2)  # RWKV-4: five tensors per layer, not three
    blob = _blob(other.zero_state(), torch.zeros(other.vocab_size))
    with pytest.raises(StateError, match=r"state has \d+ tensors, the model expects \d+"):
        await engine.decode_state(blob)


async def test_the_codec_runs_in_the_engine_worker(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    encode, decode = state_codec.encode_state, state_codec.decode_state

    def spy_encode(model: ModelState) -> bytes:
        seen.append(("encode", threading.current_thread().name))
        return encode(model)

    def spy_decode(blob: bytes, template: list[torch.Tensor], vocab: int) -> ModelState:
        seen.append(("decode", threading.current_thread().name))
        assert vocab == engine.vocab_size and len(template) == len(engine.zero_state().state)
        return decode(blob, template, vocab)

    monkeypatch.setattr(state_codec, "encode_state", spy_encode)
    monkeypatch.setattr(state_codec, "decode_state", spy_decode)
    await engine.decode_state(await engine.encode_state(engine.zero_state()))
    assert seen == [("encode", "raven-engine"), ("decode", "raven-engine")]


async def test_the_engine_tells_its_vocabulary_and_tokenizer(engine: Engine) -> None:
    assert engine.vocab_size == engine.backend.vocab_size == 65536
    assert engine.tokenizer_name == engine.tokenizer.name == "rwkv_vocab_v20230424"
    assert engine.valid_tokens([0, 1, 500, 65535])
    assert engine.valid_tokens([])
    assert not engine.valid_tokens([1, 65536])
    assert not engine.valid_tokens([-1])
    assert not engine.valid_tokens([1, "2"])  # type: ignore[list-item]  # ids from a damaged row
    assert not engine.valid_tokens([1, 2.0])  # type: ignore[list-item]


def test_a_generate_request_has_no_label() -> None:
    with pytest.raises(TypeError, match="label"):
        GenerateRequest(start=None, prompt_tokens=[1], sampling=SamplingParams(), stop_strings=(),  # type: ignore[arg-type, call-arg]
                        seed=1, label="x")


async def test_in_fresh_thread_runs_the_work_in_a_thread_that_ends() -> None:
    threads: list[threading.Thread] = []

    def work() -> int:
        threads.append(threading.current_thread())
        return 41 + 1

    assert await in_fresh_thread(work) == 42
    assert threads[0] is not threading.current_thread() and threads[0].name == "raven-load"
    threads[0].join(5)
    assert not threads[0].is_alive()

    def broken() -> None:
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        await in_fresh_thread(broken)


async def test_in_fresh_thread_leaves_the_event_loop_free() -> None:
    release = threading.Event()
    task = asyncio.create_task(in_fresh_thread(lambda: release.wait(10)))
    await asyncio.sleep(0.01)
    assert not task.done()  # the loop runs while the work blocks
    release.set()
    assert await asyncio.wait_for(task, 10) is True


def test_run_in_fresh_thread_sets_its_torch_threads_and_no_grad_and_waits() -> None:
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen: dict[str, object] = {}

    def work() -> str:
        seen["threads"] = torch.get_num_threads()
        seen["grad"] = torch.is_grad_enabled()
        seen["thread"] = threading.current_thread()
        return "done"

    try:
        assert run_in_fresh_thread(work, name="raven-test", torch_threads=want) == "done"
    finally:
        torch.set_num_threads(before)
    worker = seen["thread"]
    assert isinstance(worker, threading.Thread) and worker.name == "raven-test"
    assert worker is not threading.current_thread() and not worker.is_alive()
    assert seen["threads"] == want and seen["grad"] is False
    assert torch.is_grad_enabled()

    def broken() -> None:
        raise KeyError("lost")

    with pytest.raises(KeyError, match="lost"):
        run_in_fresh_thread(broken)
