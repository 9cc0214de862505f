"""The buttons on Raven's Discord replies: **Stop** while a reply is written, **Retry** and **Continue**
once it is done, and **Forget** to confirm ``/forget``.

A button's ``custom_id`` names its action and its thread (``raven:retry:<thread id>``), and the
button class is registered with the client at start-up (discord.py's ``DynamicItem``), so buttons
posted before a restart still work after it: nothing is kept per message.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal, cast

import discord

Action = Literal["stop", "retry", "continue", "forget"]
TEMPLATE = re.compile(r"raven:(?P<action>stop|retry|continue|forget):(?P<thread>[0-9]{1,20})")
_LOOKS: dict[Action, tuple[str, discord.ButtonStyle]] = {
    "stop": ("Stop", discord.ButtonStyle.secondary),
    "retry": ("Retry", discord.ButtonStyle.secondary),
    "continue": ("Continue", discord.ButtonStyle.secondary),
    "forget": ("Forget this thread", discord.ButtonStyle.danger),
}
Handler = Callable[[discord.Interaction, Action, int], Awaitable[None]]


def custom_id(action: Action, thread_id: int) -> str:
    return f"raven:{action}:{thread_id}"


class ControlButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=TEMPLATE):
    """One control; pressing it calls the client's ``on_control(interaction, action, thread_id)``."""

    def __init__(self, action: Action, thread_id: int) -> None:
        label, style = _LOOKS[action]
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=custom_id(action, thread_id)))
        self.action: Action = action
        self.thread_id = thread_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> ControlButton:
        return cls(cast(Action, match["action"]), int(match["thread"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        handler: Handler | None = getattr(interaction.client, "on_control", None)
        if handler is not None:
            await handler(interaction, self.action, self.thread_id)


def controls(thread_id: int, *actions: Action) -> discord.ui.View:
    """A view holding the given buttons for a thread (no timeout: the buttons outlive the process)."""
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(ControlButton(action, thread_id))
    return view
