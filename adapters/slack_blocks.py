"""Block Kit for Raven's Slack replies: the reply's text as section blocks, and the buttons under it.

A message with ``blocks`` shows the blocks instead of its ``text`` (the text stays the notification
and what the log is compared with), so every reply message carries its text as sections as well: a
button row can then be added or taken away with ``chat.update`` without changing what the message
says. Only the last message of a thread's last reply carries buttons:

- ``writing``: **Stop**, while the reply is being written;
- ``done``: **Retry** and **Continue**, once it is complete;
- ``forget``: **Forget this thread**, under the core's ``/forget`` question.

Each button's ``value`` is the thread's id (``channel:thread_ts``), so a click names its thread.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from adapters.text_split import split_message

Controls = Literal["writing", "done", "forget"]
STOP = "raven_stop"
RETRY = "raven_retry"
CONTINUE = "raven_continue"
FORGET = "raven_forget"
ACTION_IDS = re.compile(f"^({STOP}|{RETRY}|{CONTINUE}|{FORGET})$")
CONTROLS_BLOCK = "raven_controls"
SECTION_CHARS = 3000  # Slack's limit for a section's text
Block = dict[str, Any]


def button(action_id: str, label: str, value: str, style: str | None = None) -> Block:
    shown: Block = {"type": "button", "action_id": action_id, "value": value,
                    "text": {"type": "plain_text", "text": label}}
    if style is not None:
        shown["style"] = style
    return shown


def controls_block(controls: Controls, thread_id: str) -> Block:
    if controls == "writing":
        buttons = [button(STOP, "Stop", thread_id)]
    elif controls == "done":
        buttons = [button(RETRY, "Retry", thread_id), button(CONTINUE, "Continue", thread_id)]
    else:
        buttons = [button(FORGET, "Forget this thread", thread_id, style="danger")]
    return {"type": "actions", "block_id": CONTROLS_BLOCK, "elements": buttons}


def sections(text: str) -> list[Block]:
    """``text`` (mrkdwn) as section blocks of at most Slack's 3,000 characters each."""
    return [{"type": "section", "text": {"type": "mrkdwn", "text": part}}
            for part in split_message(text, SECTION_CHARS) if part]


def message_blocks(text: str, controls: Controls | None = None, thread_id: str = "") -> list[Block]:
    """The blocks of one reply message: its text, then its buttons (if any)."""
    blocks = sections(text)
    if controls is not None:
        blocks.append(controls_block(controls, thread_id))
    return blocks


def forget_prompt(question: str, thread_id: str) -> list[Block]:
    """The private answer to ``/forget``: the question and the button that confirms it."""
    return [*sections(question), controls_block("forget", thread_id)]
