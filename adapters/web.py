"""The web chat page and its HTTP API, served by uvicorn in the same process and event loop as the
other adapters.

A web thread is named by the caller: ``(user_id, discussion_id)`` becomes
``ThreadKey("web", "<user_id>/<discussion_id>")``. The seed's ``POST /generate-response`` keeps its
JSON shape; ``prompt_file`` picks the persona (``SQLAdvisor`` → ``sql``, ``ProjectAdvisor`` →
``project``, or a persona's own name). When it differs from the thread's persona (or the thread is
new) the message is sent to the core as ``/advisor <persona> <message>``, so the core switches the
persona and answers in one turn; everything else about threads, personas and history is the core's.

Security: loopback by default, and then only requests addressed to a loopback name (a page of
another site whose name resolves to 127.0.0.1, DNS rebinding, is refused); with ``RAVEN_WEB_TOKEN``
set every API call needs ``Authorization: Bearer <token>`` (or the page's session cookie),
compared in constant time and never logged. Request bodies are capped at
``RAVEN_WEB_MAX_BODY_BYTES``; CORS is off unless ``RAVEN_WEB_CORS_ORIGINS`` names origins. See the README's web section.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html as html_text
import json
import logging
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.settings import LOOPBACK_HOSTS, WebSettings
from adapters.web_markdown import render as render_markdown
from bot.core.commands import parse_command
from bot.core.outcomes import Answered, Busy, CommandDone, CutOff, Failed, Outcome, Refused
from bot.core.text import clean_text
from bot.errors import ConfigError, InputError, PersonaError, StoreError
from bot.events import Event, ThreadKey

if TYPE_CHECKING:
    from bot.core.service import ChatService, StoredMessage, ThreadInfo
    from bot.core.turn import Turn

log = logging.getLogger(__name__)

PLATFORM = "web"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# user and discussion ids: 1-64 of letters, digits, '_', '-', '.', '@' (no '/', so the pair is unambiguous)
ID_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ID_RULE = "1-64 characters: letters, digits, '_', '-', '.', '@'"
# the seed's prompt files, matched case-insensitively; any other value is a persona name
PROMPT_FILE_ALIASES = {"sqladvisor": "sql", "projectadvisor": "project"}
SESSION_COOKIE = "raven_session"
CHATUX_COOKIE = "raven_chatux"
CHATUX_USER = "chatux"
"""chatux conversations are web threads of this user: ``web:chatux/<thread or s-<session id>>``."""
SSE_PING_S = 15
MetricsSource = Callable[[], Awaitable[tuple[bytes, str]]]
"""What ``/metrics`` answers: the exposition and its content type (``bot/app/metrics.py`` provides it)."""
# The page loads nothing but its own files; the browser enforces it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- request and response shapes ---------------------------------------------------------------------


def _check_id(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{name} must be a string")
    text = str(value)
    if not ID_PATTERN.fullmatch(text):
        raise ValueError(f"{name} must be {ID_RULE}")
    return text


class ChatRequest(BaseModel):
    """The seed's request; ``prompt_file`` may be left out to keep the thread's persona."""

    model_config = ConfigDict(extra="ignore")

    user_message: str = Field(description="The user's message, or a command such as /reset")
    user_id: str = Field(description=f"Who is asking ({ID_RULE}); a number is accepted")
    discussion_id: str = Field(description=f"The thread, per user ({ID_RULE}); a number is accepted")
    prompt_file: str | None = Field(
        None, description="Persona: SQLAdvisor, ProjectAdvisor or a persona name; omit to keep the thread's"
    )
    user_name: str | None = Field(None, max_length=64, description="Display name stored with the message")

    @field_validator("user_id", "discussion_id", mode="before")
    @classmethod
    def _ids(cls, value: Any, info: Any) -> str:
        return _check_id(value, info.field_name)

    @field_validator("user_message")
    @classmethod
    def _message(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("user_message must not be empty")
        return value

    @property
    def key(self) -> ThreadKey:
        return ThreadKey(PLATFORM, f"{self.user_id}/{self.discussion_id}")


OutcomeName = Literal["answered", "cut_off", "command"]


class ThreadOut(BaseModel):
    discussion_id: str
    persona: str
    title: str
    created_at: float
    updated_at: float
    forked_from: str | None = Field(None, description="the discussion_id this thread was forked from")


class MessageOut(BaseModel):
    id: int = Field(description="the message's id (a reply's is ``at_reply`` of …/fork)")
    role: str
    author: str
    text: str
    created_at: float
    html: str | None = Field(None, description="a reply's text rendered from Markdown and sanitised")
    in_context: bool = Field(
        False, description="part of what the thread's state holds now (a reply here can be forked from)")


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at_reply: int | None = Field(
        None, description="fork at this reply (a message id of the thread's context); omit: where it is now")
    discussion_id: str | None = Field(None, description=f"the new thread's id ({ID_RULE}); omit to get one")

    @field_validator("discussion_id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> str | None:
        return None if value is None else _check_id(value, "discussion_id")


def _thread_out(info: ThreadInfo, prefix: str) -> ThreadOut:
    """A thread as the API shows it; ``prefix`` is ``"<user_id>/"``."""
    source = info.forked_from
    forked_from = None
    if source is not None:
        forked_from = (source.thread_id.removeprefix(prefix)
                       if source.platform == PLATFORM and source.thread_id.startswith(prefix) else str(source))
    return ThreadOut(discussion_id=info.key.thread_id.removeprefix(prefix), persona=info.persona,
                     title=_title(info.title), created_at=info.created_at, updated_at=info.updated_at,
                     forked_from=forked_from)


def new_discussion_id() -> str:
    return f"d-{int(time.time() * 1000):x}-{secrets.token_hex(3)}"


def chatux_output(text: str, **extra: Any) -> dict[str, Any]:
    """chatux's answer shape. The page puts ``value`` in as HTML: escaped first, then ``<br>`` per line."""
    value = html_text.escape(text.replace("\r\n", "\n")).replace("\n", "<br>")
    return {"output": [{"type": "text", "value": value}], **extra}


class ChatResponse(BaseModel):
    generated_text: str = Field(description="Raven's reply (or what a command did), as shown")
    outcome: OutcomeName = Field("answered", description="answered; cut_off (timeout or token limit); command")
    notice: str | None = Field(None, description="What to tell the user beside the reply (a cut-off note)")


class ReplyDone(ChatResponse):
    """The stream's ``done`` event: the answer, and the reply as sanitised HTML for a page."""

    html: str = Field("", description="generated_text rendered from Markdown and sanitised (no script can run)")
    reply_id: int | None = Field(None, description="the reply's message id (``at_reply`` of …/fork)")
    thread: ThreadOut | None = Field(None, description="a typed /fork: the new thread")


def _done(response: ChatResponse, outcome: Outcome | None = None, thread: ThreadOut | None = None) -> str:
    reply_id = getattr(outcome, "reply_id", None) or None  # 0: a reply stopped before its first word
    done = ReplyDone(**response.model_dump(), html=render_markdown(response.generated_text), reply_id=reply_id,
                     thread=thread)
    return done.model_dump_json(exclude={"thread"} if thread is None else None)


class Problem(BaseModel):
    detail: str
    reason: str | None = None


def _success(outcome: Outcome, before: str = "") -> ChatResponse:
    """``before``: what a persona switch made as its own turn showed first."""
    if isinstance(outcome, CutOff):
        return ChatResponse(generated_text=before + outcome.text, outcome="cut_off", notice=outcome.message)
    if isinstance(outcome, CommandDone):
        return ChatResponse(generated_text=before + outcome.text, outcome="command", notice=None)
    assert isinstance(outcome, Answered)
    return ChatResponse(generated_text=before + outcome.text, outcome="answered", notice=None)


def _refusal(outcome: Busy | Refused | Failed) -> JSONResponse:
    """A turn that produced no answer, as an HTTP error: busy 503 (with Retry-After), over a rate
    limit 429 (with Retry-After), refused input 422, a failure 500."""
    if isinstance(outcome, Busy):
        return JSONResponse({"detail": outcome.message, "reason": "busy"}, status_code=503,
                            headers={"Retry-After": str(outcome.retry_after_s)})
    if isinstance(outcome, Refused) and outcome.reason == "rate_limited":
        return JSONResponse({"detail": outcome.message, "reason": outcome.reason}, status_code=429,
                            headers={"Retry-After": str(outcome.retry_after_s)})
    if isinstance(outcome, Refused):
        return JSONResponse({"detail": outcome.message, "reason": outcome.reason}, status_code=422)
    return JSONResponse({"detail": outcome.message, "reason": "failed"}, status_code=500)


class PersonaOut(BaseModel):
    name: str
    display_name: str
    description: str




class ThreadMessagesOut(BaseModel):
    discussion_id: str
    persona: str | None
    messages: list[MessageOut]
    writing: bool = Field(False, description="a reply is being written now: follow it with GET …/live")
    forked_from: str | None = Field(None, description="the discussion_id this thread was forked from")


class Stopped(BaseModel):
    stopped: bool = Field(description="a reply was being written and is stopped")


class Rename(BaseModel):
    title: str = Field(max_length=400, description="the new title (first line, up to 80 characters, is kept)")


def _problem(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "path", "query"))
        msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _title(first_message: str | None) -> str:
    """A thread's title is its first message; show a persona switch by its question."""
    text = (first_message or "").strip()
    command = parse_command(text)
    if command is not None and command.name == "advisor" and command.rest:
        text = command.rest
    return text[:120]


# --- the token ----------------------------------------------------------------------------------------


class TokenGuard:
    """Checks the bearer token or the page's session cookie. The cookie holds an HMAC of the token,
    never the token itself; every comparison is constant-time."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self.session = (
            hmac.new(self._token, b"raven-web-session", hashlib.sha256).hexdigest() if self._token else None
        )

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def token_ok(self, candidate: str | None) -> bool:
        if self._token is None:
            return True
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._token)

    def request_ok(self, request: Request, bearer: str | None = None) -> bool:
        if self._token is None:
            return True
        if bearer is not None and self.token_ok(bearer):
            return True
        cookie = request.cookies.get(SESSION_COOKIE)
        assert self.session is not None
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.session.encode())


# Module level, so FastAPI can resolve the annotation (this module uses postponed annotations).
_bearer_scheme = HTTPBearer(auto_error=False, description="RAVEN_WEB_TOKEN, when one is set")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)]


# --- access log without query strings ------------------------------------------------------------------


class AccessLog:
    """One log line per request: method, path (never the query string, which may hold a token),
    status and duration. Replaces uvicorn's access log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            path = "".join(c if c.isprintable() else "?" for c in scope["path"][:200])
            log.info("web %s %s -> %s (%.0f ms)", scope["method"], path, status[0] or "-",
                     (time.monotonic() - started) * 1000)


# --- the Host header without a token ---------------------------------------------------------------------


def host_name(header: str | None) -> str | None:
    """The name in a ``Host`` header, lower case, without port, brackets or a trailing dot."""
    if not header:
        return None
    try:
        name = urlsplit("//" + header).hostname
    except ValueError:  # "[::1" and the like
        return None
    return name.rstrip(".") if name else None


class HostGuard:
    """Without a token, serves only requests whose ``Host`` names this machine by a loopback name
    (or ``RAVEN_WEB_HOST``). A page of another site whose name resolves to 127.0.0.1 (DNS
    rebinding) sends its own name here, so it can neither read threads nor post; other answers are
    a 400 ``{"detail"}``. Starlette's TrustedHostMiddleware does the same check but answers in
    plain text."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and host_name(Headers(scope=scope).get("host")) not in self.allowed:
            names = ", ".join(sorted(self.allowed))
            response = JSONResponse({
                "detail": f"this server answers only to its loopback names ({names}) while RAVEN_WEB_TOKEN "
                          "is unset; open it as http://127.0.0.1:<port>/ or set a token",
                "reason": "host"}, status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- the app -------------------------------------------------------------------------------------------


def create_app(service: ChatService, settings: WebSettings, metrics: MetricsSource | None = None) -> FastAPI:
    """The FastAPI app for one service (and ``/metrics`` when given). Nothing starts until an ASGI
    server runs it."""
    token = settings.token.get_secret_value() if settings.token else None
    guard = TokenGuard(token)
    max_body = settings.max_body_bytes

    app = FastAPI(
        title="Raven web API",
        version="1",
        description="Chat with Raven's personas. See the README's web section.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    async def require_token(request: Request, credentials: BearerCredentials) -> None:
        if not guard.request_ok(request, credentials.credentials if credentials else None):
            raise HTTPException(
                401,
                "missing or wrong token: send 'Authorization: Bearer <RAVEN_WEB_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    Authorized = Depends(require_token)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # JSON, not Starlette's plain-text 500; uvicorn still logs the traceback.
        return JSONResponse({"detail": "internal error (the server log has the details)", "reason": "failed"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _problem(list(exc.errors()))}, status_code=422)

    # --- helpers --------------------------------------------------------------------------------------

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise HTTPException(413, f"request body is larger than {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise HTTPException(413, f"request body is larger than {max_body} bytes")
        return bytes(body)

    async def read_chat_request(request: Request) -> ChatRequest:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            # Also keeps other web sites from posting here with a plain HTML form (no CORS preflight).
            raise HTTPException(415, "send the body as JSON with 'Content-Type: application/json'")
        body = await read_body(request)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:  # "[" * 30000: the parser's stack, not ours to grow
            raise HTTPException(400, "the body is not valid JSON: it is nested too deeply") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "the body must be a JSON object")
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as exc:
            raise HTTPException(422, _problem(list(exc.errors()))) from None

    def persona_names() -> list[str]:
        return [p.name for p in service.personas()]

    def resolve_persona(prompt_file: str) -> str:
        raw = prompt_file.strip()
        name = PROMPT_FILE_ALIASES.get(raw.lower(), raw.lower())
        try:
            return service.persona(name).name
        except PersonaError:
            raise HTTPException(
                422,
                f"unknown persona {raw[:40]!r} in prompt_file; choose one of: "
                f"{', '.join(persona_names())} (or SQLAdvisor, ProjectAdvisor)",
            ) from None

    async def thread_persona(key: ThreadKey) -> str | None:
        info = await service.thread(key)
        return info.persona if info is not None else None

    def event(chat: ChatRequest, text: str) -> Event:
        return Event(thread=chat.key, user_id=chat.user_id, user_name=chat.user_name or chat.user_id, text=text)

    async def start_turn(chat: ChatRequest) -> tuple[str, Turn] | JSONResponse:
        """The turn answering a request, and what was shown before it (a persona switch made on
        its own), or the refusal. The message limit counts the user's text only: a switch rides
        along as ``/advisor <persona> <text>`` when that fits, and goes first as its own turn when not."""
        text = chat.user_message
        limit = service.settings.max_message_chars
        try:
            clean_text(text, limit)
        except InputError as exc:
            reason = "too_long" if exc.reason == "too_long" else "empty"
            return JSONResponse({"detail": str(exc), "reason": reason}, status_code=422)
        if chat.prompt_file is None or not chat.prompt_file.strip():
            return "", service.reply(event(chat, text))
        persona = resolve_persona(chat.prompt_file)
        # A command (/reset, /advisor x, ...) goes through as typed; a message to a thread that is
        # new or has another persona switches it first, in the same turn when the limit allows.
        if service.command(text) is not None or await thread_persona(chat.key) == persona:
            return "", service.reply(event(chat, text))
        switch = f"/advisor {persona}"
        combined = f"{switch} {text}"
        if len(clean_text(combined, len(combined))) <= limit:  # as the core will count it
            return "", service.reply(event(chat, combined))
        first = service.reply(event(chat, switch))
        said = await first.text()
        outcome = await first.outcome()
        if isinstance(outcome, Busy | Refused | Failed):
            return _refusal(outcome)
        await service.delivered(first)
        return said, service.reply(event(chat, text))

    def thread_key(user_id: str, discussion_id: str) -> ThreadKey:
        try:
            user = _check_id(user_id, "user_id")
            discussion = _check_id(discussion_id, "discussion_id")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return ThreadKey(PLATFORM, f"{user}/{discussion}")

    async def fork(user_id: str, source: ThreadKey, at_reply: int | None, discussion_id: str | None) -> ThreadOut:
        """A new thread of the same user starting where ``source`` is (or at one of its replies): the
        core copies the context and the state. 409 when the new id is taken, 422 for a reply that
        is not in the context; the caller has checked that ``source`` exists."""
        prefix = f"{user_id}/"
        discussion = discussion_id or new_discussion_id()
        target = ThreadKey(PLATFORM, prefix + discussion)
        taken = HTTPException(409, f"thread {discussion!r} exists already; choose another discussion_id")
        if await service.thread(target) is not None:
            raise taken
        try:
            info = await service.fork(source, target, at_reply)
        except StoreError:
            if await service.thread(target) is not None:
                raise taken from None
            raise HTTPException(422, f"at_reply {at_reply} is not a reply in this thread's context "
                                     "(see in_context in …/messages)") from None
        log.info("web: forked %s into %s", source, target)
        return _thread_out(info, prefix)

    async def typed_fork(chat: ChatRequest) -> tuple[ChatResponse, ThreadOut] | JSONResponse | None:
        """A typed ``/fork`` (the core cannot open a thread on the page): the new thread, and what to
        show; None for any other message."""
        command = service.command(chat.user_message)
        if command is None or command.name != "fork":
            return None
        if await service.thread(chat.key) is None:
            return JSONResponse({"detail": "There is nothing in this thread to fork yet.",
                                 "reason": "nothing_to_fork"}, status_code=422)
        thread = await fork(chat.user_id, chat.key, None, None)
        said = (f"Forked: the new thread **{thread.title or thread.discussion_id}** ({thread.discussion_id}) "
                "starts where this one is now; this thread is unchanged.")
        return ChatResponse(generated_text=said, outcome="command", notice=None), thread

    # --- the API --------------------------------------------------------------------------------------

    error_responses: dict[int | str, dict[str, Any]] = {
        422: {"model": Problem, "description": "invalid request, unknown persona, or a message the core refused"},
        500: {"model": Problem, "description": "answering failed"},
        503: {"model": Problem, "description": "busy: try again after Retry-After seconds"},
    }

    @app.post("/generate-response", response_model=ChatResponse, dependencies=[Authorized],
              responses=error_responses,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ChatRequest.model_json_schema()}}}})
    async def generate_response(request: Request) -> ChatResponse | JSONResponse:
        """The seed's endpoint: send one message, get the whole reply. A typed ``/fork`` answers as a
        command with the new thread beside it (``thread``)."""
        chat = await read_chat_request(request)
        forked = await typed_fork(chat)
        if isinstance(forked, JSONResponse):
            return forked
        if forked is not None:
            return JSONResponse({**forked[0].model_dump(), "thread": forked[1].model_dump()})
        return await whole_reply(chat)

    async def whole_reply(chat: ChatRequest) -> ChatResponse | JSONResponse:
        """Run the turn to its end: the answer, or the refusal as an HTTP error."""
        started = await start_turn(chat)
        if isinstance(started, JSONResponse):
            return started
        before, turn = started
        await turn.text()
        outcome = await turn.outcome()
        if isinstance(outcome, Busy | Refused | Failed):
            return _refusal(outcome)
        await service.delivered(turn)  # the page and API read the reply from the log from now on
        return _success(outcome, before)

    @app.post("/generate-response/stream", dependencies=[Authorized],
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "token events, then one done event"}, **error_responses},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ChatRequest.model_json_schema()}}}})
    async def generate_response_stream(request: Request) -> Response:
        """The same request; the reply as Server-Sent Events: ``token`` events (``{"text"}``, in
        order), then one ``done`` event (the JSON of the non-streaming answer). A turn that ends
        before any text (busy, refused) is an ordinary HTTP error instead; a failure midway sends an
        ``error`` event (``{"detail"}``) before ``done``."""
        chat = await read_chat_request(request)
        forked = await typed_fork(chat)
        if isinstance(forked, JSONResponse):
            return forked
        if forked is not None:
            said, thread = forked

            async def fork_events() -> AsyncIterator[ServerSentEvent]:
                yield ServerSentEvent(json.dumps({"text": said.generated_text}), event="token")
                yield ServerSentEvent(_done(said, thread=thread), event="done")

            return EventSourceResponse(fork_events(), ping=SSE_PING_S, sep="\n")
        started = await start_turn(chat)
        if isinstance(started, JSONResponse):
            return started
        before, turn = started
        first = await anext(turn, None)
        if first is None:
            outcome = await turn.outcome()
            if isinstance(outcome, Busy | Refused | Failed) and not before:
                return _refusal(outcome)

        async def events() -> AsyncIterator[ServerSentEvent]:
            if before:
                yield ServerSentEvent(json.dumps({"text": before}), event="token")
            if first is not None:
                yield ServerSentEvent(json.dumps({"text": first}), event="token")
                async for chunk in turn:
                    yield ServerSentEvent(json.dumps({"text": chunk}), event="token")
            outcome = await turn.outcome()
            if isinstance(outcome, Busy | Refused | Failed):
                log.warning("web stream for %s ended: %s", chat.key, type(outcome).__name__)
                yield ServerSentEvent(json.dumps({"detail": outcome.message}), event="error")
                done = ChatResponse(generated_text=before + turn.shown, outcome="answered", notice=None)
            else:
                done = _success(outcome, before)
            yield ServerSentEvent(_done(done, outcome), event="done")
            await service.delivered(turn)

        return EventSourceResponse(events(), ping=SSE_PING_S, sep="\n")

    @app.get("/personas", response_model=list[PersonaOut], dependencies=[Authorized])
    async def list_personas() -> list[PersonaOut]:
        return [PersonaOut(name=p.name, display_name=p.display_name, description=p.description)
                for p in service.personas()]

    @app.get("/users/{user_id}/threads", response_model=list[ThreadOut], dependencies=[Authorized])
    async def list_threads(user_id: str) -> list[ThreadOut]:
        """The user's threads, most recently active first (``forked_from``: the thread a fork came from)."""
        prefix = thread_key(user_id, "x").thread_id[:-1]  # "<user_id>/"
        threads = await service.list_threads(PLATFORM, prefix=prefix)
        return [_thread_out(t, prefix) for t in sorted(threads, key=lambda t: t.updated_at, reverse=True)
                if t.key.platform == PLATFORM and t.key.thread_id.startswith(prefix)]

    @app.get("/users/{user_id}/threads/{discussion_id}/messages", response_model=ThreadMessagesOut,
             dependencies=[Authorized], responses={404: {"description": "no such thread"}})
    async def thread_messages(user_id: str, discussion_id: str) -> ThreadMessagesOut:
        """A thread's whole log, oldest first (earlier personas' turns included); ``in_context`` marks
        what the thread's state holds now, ``forked_from`` the thread it was forked from."""
        key = thread_key(user_id, discussion_id)
        messages = await service.thread_messages(key)
        info = await service.thread(key)
        if not messages and info is None:
            raise HTTPException(404, f"no thread {discussion_id!r} for user {user_id!r}")
        epoch = info.epoch if info is not None else None

        def in_context(m: StoredMessage) -> bool:  # as the store's context reads the log
            kept = m.status == "done" if m.role == "assistant" else m.status in ("answered", "adopted")
            return m.role != "notice" and m.epoch == epoch and kept

        def shown() -> list[MessageOut]:  # Markdown for a long thread is CPU work: off the loop
            return [MessageOut(id=m.id, role=m.role, author=m.author, text=m.text, created_at=m.created_at,
                               html=render_markdown(m.text) if m.role == "assistant" else None,
                               in_context=in_context(m))
                    for m in messages]

        return ThreadMessagesOut(
            discussion_id=discussion_id,
            persona=info.persona if info is not None else None,
            messages=await asyncio.to_thread(shown),
            writing=service.writing(key) is not None,
            forked_from=_thread_out(info, f"{user_id}/").forked_from if info is not None else None,
        )

    @app.get("/users/{user_id}/threads/{discussion_id}/live", dependencies=[Authorized], response_model=None,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the reply being written: token events, then done"},
                        204: {"description": "nothing is being written in this thread"}})
    async def follow_reply(user_id: str, discussion_id: str) -> Response:
        """The reply being written in a thread now (a page reloaded mid-reply reads along): one
        ``token`` event with the text so far, then the rest as it comes, then ``done`` as for
        ``/generate-response/stream``. 204 when nothing is being written."""
        turn = service.writing(thread_key(user_id, discussion_id))
        if turn is None:
            return Response(status_code=204)

        async def events() -> AsyncIterator[ServerSentEvent]:
            async for chunk in turn.follow():
                yield ServerSentEvent(json.dumps({"text": chunk}), event="token")
            outcome = await turn.outcome()
            if isinstance(outcome, Busy | Refused | Failed):
                yield ServerSentEvent(json.dumps({"detail": outcome.message}), event="error")
                done = ChatResponse(generated_text=turn.shown, outcome="answered", notice=None)
            else:
                done = _success(outcome)
            yield ServerSentEvent(_done(done, outcome), event="done")

        return EventSourceResponse(events(), ping=SSE_PING_S, sep="\n")

    def json_only(request: Request) -> None:
        """A control that changes a thread takes JSON only: other sites cannot send it with a form."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise HTTPException(415, "send the body as JSON with 'Content-Type: application/json'")

    JsonOnly = Depends(json_only)
    missing: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "no such thread"}}

    @app.post("/users/{user_id}/threads/{discussion_id}/stop", response_model=Stopped,
              dependencies=[Authorized, JsonOnly])
    async def stop_reply(user_id: str, discussion_id: str) -> Stopped:
        """Stop the reply being written in the thread (send ``{}``). What was written is kept as the
        reply (``outcome: cut_off``) and the saved state matches it. ``stopped: false`` when nothing
        was being written. ``…/retry`` and ``…/continue`` write a new or a longer reply."""
        return Stopped(stopped=service.stop(thread_key(user_id, discussion_id)))

    async def redo(user_id: str, discussion_id: str, command: str) -> ChatResponse | JSONResponse:
        key = thread_key(user_id, discussion_id)
        if await service.thread(key) is None:
            raise HTTPException(404, f"no thread {discussion_id!r} for user {user_id!r}")
        return await whole_reply(ChatRequest(user_message=command, user_id=user_id, discussion_id=discussion_id,
                                             prompt_file=None, user_name=None))

    @app.post("/users/{user_id}/threads/{discussion_id}/retry", response_model=ChatResponse,
              dependencies=[Authorized, JsonOnly], responses={**error_responses, **missing})
    async def retry_reply(user_id: str, discussion_id: str) -> ChatResponse | JSONResponse:
        """A new reply to the thread's last message, in place of its last reply (send ``{}``): sampled
        from the state before that reply, which Raven keeps for this. The old reply stays in the log,
        out of the context. 422 ``nothing_to_redo`` when there is no reply yet. The same as sending
        ``/retry`` (or ``++``) as the ``user_message``; stream it that way."""
        return await redo(user_id, discussion_id, "/retry")

    @app.post("/users/{user_id}/threads/{discussion_id}/continue", response_model=ChatResponse,
              dependencies=[Authorized, JsonOnly], responses={**error_responses, **missing})
    async def continue_reply(user_id: str, discussion_id: str) -> ChatResponse | JSONResponse:
        """The thread's last reply made longer (send ``{}``): ``generated_text`` is what was added; the
        log keeps one reply, the old text and the new. The same as ``/continue`` (or ``+++``)."""
        return await redo(user_id, discussion_id, "/continue")

    @app.patch("/users/{user_id}/threads/{discussion_id}", response_model=ThreadOut,
               dependencies=[Authorized, JsonOnly], responses=missing)
    async def rename_thread(user_id: str, discussion_id: str, rename: Rename) -> ThreadOut:
        """Rename a thread (``{"title": "..."}``; a blank title goes back to its first message)."""
        key = thread_key(user_id, discussion_id)
        if not await service.rename_thread(key, rename.title):
            raise HTTPException(404, f"no thread {discussion_id!r} for user {user_id!r}")
        thread = await service.thread(key)
        assert thread is not None
        return _thread_out(thread, f"{user_id}/")

    @app.post("/users/{user_id}/threads/{discussion_id}/fork", response_model=ThreadOut, status_code=201,
              dependencies=[Authorized, JsonOnly],
              responses={**missing, 409: {"model": Problem, "description": "the new discussion_id is taken"},
                         422: {"model": Problem, "description": "at_reply is not a reply in the thread's context"}})
    async def fork_thread(user_id: str, discussion_id: str, request: ForkRequest | None = None) -> ThreadOut:
        """A new thread that starts where this one is now, or at one of its replies (``at_reply``: a
        reply's ``id`` with ``in_context`` in …/messages). Its log is a copy of this thread's context
        up to there and its state a copy of this one's (one row, whatever the history), so it goes on
        exactly as this thread would; this thread is unchanged. ``discussion_id`` names the new
        thread (default: a generated one). Send ``{}`` for a fork of the thread as it is."""
        key = thread_key(user_id, discussion_id)
        request = request or ForkRequest(at_reply=None, discussion_id=None)
        if await service.thread(key) is None:
            raise HTTPException(404, f"no thread {discussion_id!r} for user {user_id!r}")
        return await fork(user_id, key, request.at_reply, request.discussion_id)

    @app.delete("/users/{user_id}/threads/{discussion_id}", status_code=204, dependencies=[Authorized],
                responses=missing)
    async def delete_thread(user_id: str, discussion_id: str) -> Response:
        """Delete a thread: its whole log and its saved state (a reply being written is stopped)."""
        if not await service.forget_thread(thread_key(user_id, discussion_id)):
            raise HTTPException(404, f"no thread {discussion_id!r} for user {user_id!r}")
        return Response(status_code=204)

    @app.get("/chat_api", dependencies=[Authorized],
             responses={403: {"model": Problem, "description": "sent by another site's page"}})
    async def chat_api(request: Request, text: str = "", thread: str | None = None) -> JSONResponse:
        """chatux-server-rwkv's endpoint, for its page unchanged: ``GET /chat_api?text=…`` answers
        ``{"output": [{"type": "text", "value": "<the reply, HTML-escaped, <br> for newlines>"}]}``.
        One conversation per browser session (a session cookie), or per ``thread`` when given
        (web user ``chatux``). A reply that cannot be given (busy, refused) is said in ``value`` too,
        with ``outcome`` saying which; a request from another site's page is refused (403)."""
        fetch_site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if fetch_site not in (None, "same-origin", "none") and origin not in settings.cors_origins:
            # A GET that runs a turn: no other site's page may make one (an <img> needs no CORS).
            return JSONResponse({"detail": "chat_api answers only this server's own pages "
                                           "(or RAVEN_WEB_CORS_ORIGINS)", "reason": "cross_site"}, status_code=403)
        session = request.cookies.get(CHATUX_COOKIE) or ""
        fresh = not ID_PATTERN.fullmatch(session)
        if fresh:
            session = secrets.token_hex(16)
        if thread is not None:
            try:
                discussion = _check_id(thread, "thread")
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
        else:
            discussion = f"s-{session}"
        if not text.strip():
            raise HTTPException(422, "text must not be empty")
        key = ThreadKey(PLATFORM, f"{CHATUX_USER}/{discussion}")
        turn = service.reply(Event(thread=key, user_id=CHATUX_USER, user_name=CHATUX_USER, text=text))
        said = await turn.text()
        outcome = await turn.outcome()
        if isinstance(outcome, Busy | Refused | Failed):
            kind = "busy" if isinstance(outcome, Busy) else "refused" if isinstance(outcome, Refused) else "failed"
            body = chatux_output(outcome.message, outcome=kind)
        else:
            await service.delivered(turn)
            shown = _success(outcome)
            body = chatux_output(said + (f"\n({shown.notice})" if shown.notice else ""), outcome=shown.outcome,
                                 notice=shown.notice)
        response = JSONResponse(body, headers={"Cache-Control": "no-store"})
        if fresh and thread is None:
            response.set_cookie(CHATUX_COOKIE, session, httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")
        return response

    if metrics is not None:
        @app.get("/metrics", include_in_schema=False, dependencies=[Authorized])
        async def metrics_page() -> Response:
            """Prometheus metrics (the token, when one is set, as a bearer token)."""
            body, content_type = await metrics()
            return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Authorized])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Authorized])
    async def docs() -> HTMLResponse:
        # Swagger UI's script and style come from a CDN; the chat page itself loads nothing external.
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Raven web API")

    # --- the page -------------------------------------------------------------------------------------

    login_html = (STATIC_DIR / "login.html").read_text(encoding="utf-8")  # read once, not per request
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if guard.enabled:  # the page shows "Sign out"
        index_html = index_html.replace("<body>", '<body data-auth="token">', 1)

    def login_page(status: int, error: str = "") -> HTMLResponse:
        html = login_html
        note = f'<p class="error" role="alert">{error}</p>' if error else ""
        return HTMLResponse(html.replace("<!--error-->", note), status_code=status, headers=PAGE_HEADERS)

    def signed_in(target: str, request: Request) -> RedirectResponse:
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        assert guard.session is not None
        response.set_cookie(SESSION_COOKIE, guard.session, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @app.get("/", include_in_schema=False, response_model=None)
    async def page(request: Request, token: str | None = None) -> Response:
        if guard.enabled:
            if token is not None:  # "/?token=..." once: swap it for a cookie and drop it from the URL
                if guard.token_ok(token):
                    return signed_in("/", request)
                return login_page(401, "Wrong token.")
            if not guard.request_ok(request):
                return login_page(401)
        return HTMLResponse(index_html, headers=PAGE_HEADERS)

    @app.post("/login", include_in_schema=False, response_model=None)
    async def login(request: Request) -> Response:
        if not guard.enabled:
            return RedirectResponse("/", status_code=303)
        fields = parse_qs((await read_body(request)).decode("utf-8", "replace"))
        if guard.token_ok((fields.get("token") or [""])[0]):
            return signed_in("/", request)
        return login_page(401, "Wrong token.")

    @app.post("/logout", include_in_schema=False)
    async def logout() -> RedirectResponse:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    if not guard.enabled:
        app.add_middleware(HostGuard, allowed=frozenset({*LOOPBACK_HOSTS, settings.host.lower().strip("[]")}))
    app.add_middleware(AccessLog)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"], allow_credentials=False,
        )
    return app


# --- serving -------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: whoever runs the adapter (``raven run``/``raven web``)
    owns the signals and stops us by cancelling ``run()``."""

    def __init__(self, config: uvicorn.Config, ready: asyncio.Event) -> None:
        super().__init__(config)
        self.ready = ready

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.set()


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(
            f"RAVEN_WEB_HOST/RAVEN_WEB_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


class WebAdapter:
    """Serves the page and the API on ``settings.host:port`` until cancelled."""

    def __init__(self, service: ChatService, settings: WebSettings, metrics: MetricsSource | None = None) -> None:
        if not settings.local and settings.token is None:
            # WebSettings checks this when RAVEN_WEB_ENABLED is set; check again for any other caller.
            raise ConfigError(
                f"RAVEN_WEB_TOKEN must be set when RAVEN_WEB_HOST binds beyond localhost ({settings.host!r})"
            )
        self.service = service
        self.settings = settings
        self.app = create_app(service, settings, metrics)
        self.port: int | None = None
        self._ready = asyncio.Event()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the web adapter is not listening yet")
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def wait_started(self) -> None:
        """Returns once the server accepts connections (tests; ``raven web`` logs the URL)."""
        await self._ready.wait()

    async def run(self) -> None:
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=5,
        )
        sock = _listen(self.settings.host, self.settings.port)
        self.port = sock.getsockname()[1]
        server = _Server(config, self._ready)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="raven-web")
        log.info("web chat page on %s/", self.url)
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
            raise
        finally:
            sock.close()
