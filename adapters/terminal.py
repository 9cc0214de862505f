"""Terminal chat: the same core as the chat platforms, on stdin/stdout.

On a terminal it prompts and streams tokens as they arrive; Ctrl-C while a reply is being written
stops it (what was written is kept), Ctrl-C at the prompt quits. When stdin is not a terminal it reads
one message per line, prints each reply, and exits at end of input (scripts and tests use this).
``/fork`` continues in a new thread that starts where this one is (``raven chat --thread`` the old
name goes back to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import sys
import threading
from collections.abc import Callable, Iterator
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

    @contextlib.contextmanager
    def _interrupt(self, action: Callable[[], object]) -> Iterator[None]:
        """Ctrl-C does ``action`` for a while (on a terminal), then quits again as before."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        if not self.stdin.isatty() or main is None:
            yield
            return
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, action)
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGINT, main.cancel)

    async def _say(self, text: str) -> None:
        command = self.service.command(text, addressed=True)
        if command is not None and command.name == "fork":
            await self._fork()
            return
        turn = self.service.reply(self._event(text))
        with self._interrupt(lambda: self.service.stop(self.key)):
            async for chunk in turn:
                self.stdout.write(chunk)
                self.stdout.flush()
        outcome = await turn.outcome()
        if isinstance(outcome, NOTICES):  # a notice, not Raven's words: set apart in brackets
            self.stdout.write(("\n" if turn.shown else "") + f"[{outcome.message}]")
        self.stdout.write("\n")
        self.stdout.flush()
        await self.service.delivered(turn)

    async def _fork(self) -> None:
        """Continue in a new thread with this one's log and state (this one stays as it is)."""
        if await self.service.thread(self.key) is None:
            self.stdout.write("[nothing to fork yet: say something first]\n")
            return
        n = 1
        while await self.service.thread(ThreadKey(PLATFORM, f"{self.key.thread_id}-fork-{n}")) is not None:
            n += 1
        target = ThreadKey(PLATFORM, f"{self.key.thread_id}-fork-{n}")
        await self.service.fork(self.key, target)
        self.stdout.write(f"[forked: now in thread '{target.thread_id}'; "
                          f"`raven chat --thread {self.key.thread_id}` goes back to '{self.key.thread_id}']\n")
        self.stdout.flush()
        self.key = target

    async def _read_line(self, prompt: str) -> str | None:
        interactive = self.stdin.isatty()
        if interactive:
            self.stdout.write(prompt)
            self.stdout.flush()
        line = await self._readline()
        return None if line == "" else line.rstrip("\n")

    async def _readline(self) -> str:
        """One line of stdin, read in a daemon thread: never blocks the event loop, and Ctrl-C at the
        prompt can end the program while the read is still waiting (a pool thread would hold it)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()

        def settle(line: str) -> None:
            if not done.done():
                done.set_result(line)

        def read() -> None:
            line = self.stdin.readline()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(settle, line)

        threading.Thread(target=read, name="raven-stdin", daemon=True).start()
        return await done

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
