"""Terminal chat: the same core as the chat platforms, on stdin/stdout.

On a terminal it prompts and streams tokens as they arrive. When stdin is not a terminal it reads
one message per line, prints each reply, and exits at end of input (scripts and tests use this).
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from typing import TextIO

from bot.core.outcomes import NOTICES
from bot.core.service import ChatService
from bot.events import Event, ThreadKey

PLATFORM = "terminal"


class TerminalChat:
    def __init__(self, service: ChatService, thread: str = "default", persona: str | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self.service = service
        self.key = ThreadKey(PLATFORM, thread)
        self.persona = persona
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.user = getpass.getuser()

    def _event(self, text: str) -> Event:
        return Event(thread=self.key, user_id=self.user, user_name=self.user, text=text)

    async def _say(self, text: str) -> None:
        turn = self.service.reply(self._event(text))
        async for chunk in turn:
            self.stdout.write(chunk)
            self.stdout.flush()
        outcome = await turn.outcome()
        if isinstance(outcome, NOTICES):  # a notice, not Raven's words: set apart in brackets
            self.stdout.write(("\n" if turn.shown else "") + f"[{outcome.message}]")
        self.stdout.write("\n")
        self.stdout.flush()
        await self.service.delivered(turn)

    async def _read_line(self, prompt: str) -> str | None:
        interactive = self.stdin.isatty()
        if interactive:
            self.stdout.write(prompt)
            self.stdout.flush()
        line = await asyncio.to_thread(self.stdin.readline)  # never block the event loop
        return None if line == "" else line.rstrip("\n")

    async def run(self) -> None:
        if self.persona is not None:
            thread = await self.service.thread(self.key)
            if thread is None or thread.persona != self.persona:
                await self._say(f"/advisor {self.persona}")
        interactive = self.stdin.isatty()
        if interactive:
            self.stdout.write(f"Raven terminal chat — thread '{self.key.thread_id}'. "
                              "Type /help for commands, Ctrl-D to quit.\n")
        while True:
            line = await self._read_line("you> ")
            if line is None:
                break
            if not line.strip():
                continue
            if interactive:
                self.stdout.write("raven> ")
            await self._say(line)
