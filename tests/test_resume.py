"""A thread resumed from its saved state continues exactly as if the model re-read the whole log."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.app.assembly import open_service
from bot.core.prompt import PromptFormat
from bot.events import Event, ThreadKey
from bot.inference.rwkv_package import load_package_model
from bot.inference.state_codec import decode_state
from tests.conftest import SettingsFactory

TOLERANCE = 1e-4  # fp32 on the CPU; observed differences are ~1e-6


async def _say(service, key: ThreadKey, text: str) -> str:  # type: ignore[no-untyped-def]
    return "".join([chunk async for chunk in service.reply(Event(key, "u1", "Ann", text))])


@pytest.mark.parametrize("family", ["v7", "v4"])
async def test_resume_from_saved_state_equals_rereading_history(
    family: str, settings_factory: SettingsFactory, tiny_v7_path: Path, tiny_v4_path: Path
) -> None:
    path = tiny_v7_path if family == "v7" else tiny_v4_path
    key = ThreadKey("test", f"resume-{family}")
    async with open_service(settings_factory(model=path)) as service:
        await _say(service, key, "Hello, who are you?")
        await _say(service, key, "Tell me about SQL indexes.\n\nAnd about\r\nviews.")
        assert service.last_turn(key).resumed_from == "memory"  # type: ignore[union-attr]
        stored = await service.store.load_state(key)
        messages = await service.thread_messages(key)
        fmt = PromptFormat(service.engine.tokenizer, service.family, service.persona("default"))
        template = service.engine.backend.zero_state()
        vocab = service.engine.backend.vocab_size
    assert stored is not None and stored.checksum_ok
    saved = decode_state(stored.blob, template, vocab)

    history = fmt.system_tokens()
    for message in messages:
        if message.role == "assistant":
            assert message.tokens, "the log keeps the token ids the model read for each reply"
            history += message.tokens
        else:
            history += fmt.user_turn_tokens(message.text)
    assert saved.token_count == len(history)

    new_turn = fmt.user_turn_tokens("And what about joins?")
    _, reference = load_package_model(path, "cpu fp32")
    resumed, _ = reference.forward(new_turn, [t.clone() for t in saved.state])
    from_scratch, _ = reference.forward(history + new_turn, None)
    difference = (resumed.float() - from_scratch.float()).abs().max().item()
    assert difference <= TOLERANCE, difference
    assert torch.isfinite(resumed).all()
