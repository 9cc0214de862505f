"""``ChatService.shutdown`` when a reply outlasts its grace, in-process on the real engine and store:
the reply is cut off (kept, "Raven is restarting"), not cancelled, so every reader of the turn gets
its outcome. (Cancelling the turns through the grace's timeout left adapters waiting forever and the
process hung after SIGTERM; the real-process test is tests/test_shutdown.py.)"""

from __future__ import annotations

import asyncio

from bot.app.assembly import open_service
from bot.core.outcomes import CutOff
from bot.events import Event, ThreadKey
from tests.conftest import SettingsFactory


async def test_a_reply_outlasting_the_grace_is_cut_off_and_its_reader_gets_the_outcome(
        settings_factory: SettingsFactory) -> None:
    # greedy and unbounded: the tiny model writes on until it is stopped
    settings = settings_factory(max_reply_tokens=8192, reply_timeout_s=600, top_k=1)
    key = ThreadKey("test", "long")
    async with open_service(settings) as service:
        turn = service.reply(Event(key, "alice", "Alice", "tell me everything"))
        reader = aiter(turn)
        first = await asyncio.wait_for(anext(reader), 60)  # streaming now
        await asyncio.wait_for(service.shutdown(grace_s=0.3), 30)
        rest = [chunk async for chunk in reader]
        outcome = await asyncio.wait_for(turn.outcome(), 5)
        assert isinstance(outcome, CutOff) and "restarting" in outcome.message
        messages = await service.thread_messages(key)
        assert [(m.role, m.status) for m in messages] == [("user", "answered"), ("assistant", "done")]
        assert messages[1].text == (first + "".join(rest)).strip()  # what was shown is what was kept
