// Raven's chat page: plain JavaScript, no build step, nothing loaded from elsewhere.
// It talks to the same server's API (the README's web section): personas, the user's threads, a thread's
// messages, and POST /generate-response/stream, read as Server-Sent Events with fetch().
"use strict";

(() => {
  const USER_KEY = "raven.userId";
  const THREAD_KEY = "raven.discussionId";
  const PERSONA_KEY = "raven.persona";
  const ID_PATTERN = /^[A-Za-z0-9_.@-]{1,64}$/;

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: $("app"),
    threads: $("threads"),
    noThreads: $("no-threads"),
    newThread: $("new-thread"),
    toggle: $("toggle-threads"),
    persona: $("persona"),
    hint: $("persona-hint"),
    reset: $("reset"),
    messages: $("messages"),
    status: $("status"),
    form: $("composer"),
    input: $("message"),
    send: $("send"),
  };

  function randomHex(bytes) {
    const values = new Uint8Array(bytes);
    crypto.getRandomValues(values);
    return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // The browser keeps one user id; it names this browser's threads (it is not a password).
  function loadUserId() {
    let id = localStorage.getItem(USER_KEY);
    if (!id || !ID_PATTERN.test(id)) {
      id = "u-" + randomHex(8);
      localStorage.setItem(USER_KEY, id);
    }
    return id;
  }

  const state = {
    user: loadUserId(),
    discussion: null, // the open thread's discussion_id
    threadPersona: null, // its persona on the server (null: not created yet)
    personas: [],
    busy: false,
  };

  // --- talking to the server ---------------------------------------------------------------------

  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    const response = await fetch(path, { credentials: "same-origin", ...options, headers });
    if (response.status === 401) {
      // The token is missing or changed: the page's address shows the sign-in form.
      window.location.assign("/");
      throw new Error("not signed in");
    }
    return response;
  }

  async function problem(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      return JSON.stringify(body.detail ?? body);
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  // Reads a text/event-stream body and calls onEvent(name, data) for each event (data is JSON).
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        let name = "message";
        const data = [];
        for (const raw of block.split(/\r?\n/)) {
          if (!raw || raw.startsWith(":")) continue; // a comment (keep-alive ping)
          const colon = raw.indexOf(":");
          const field = colon < 0 ? raw : raw.slice(0, colon);
          let text = colon < 0 ? "" : raw.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
        if (data.length) onEvent(name, JSON.parse(data.join("\n")));
      }
    }
  }

  // --- rendering ---------------------------------------------------------------------------------

  // Text only (never innerHTML): paragraphs keep their line breaks, ``` fences become code blocks.
  function renderText(element, text) {
    element.replaceChildren();
    const parts = text.split("```");
    parts.forEach((part, index) => {
      if (index % 2 === 1) {
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        code.textContent = part.replace(/^[^\n]*\n/, (line) => (/^\w*\n$/.test(line) ? "" : line));
        pre.append(code);
        element.append(pre);
      } else if (part) {
        const span = document.createElement("span");
        span.className = "text";
        appendInline(span, part);
        element.append(span);
      }
    });
  }

  // **bold**, `code` and _italic_ (what the core's notices use); everything else stays plain text.
  const INLINE = /(\*\*[^*\n]+\*\*|`[^`\n]+`|(?<!\w)_[^_\n]+_(?!\w))/;
  function appendInline(parent, text) {
    text.split(INLINE).forEach((piece, index) => {
      if (index % 2 === 0) {
        if (piece) parent.append(document.createTextNode(piece));
        return;
      }
      const tag = piece.startsWith("**") ? "strong" : piece.startsWith("`") ? "code" : "em";
      const node = document.createElement(tag);
      node.textContent = piece.slice(tag === "strong" ? 2 : 1, tag === "strong" ? -2 : -1);
      parent.append(node);
    });
  }

  function addMessage(role, text, extraClass) {
    const item = document.createElement("article");
    item.className = `msg ${role}` + (extraClass ? ` ${extraClass}` : "");
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : role === "assistant" ? "Raven" : "Note";
    const body = document.createElement("div");
    body.className = "body";
    renderText(body, text);
    item.append(who, body);
    ui.messages.append(item);
    scrollDown();
    return item;
  }

  // A reply that turned out to be a notice (busy, refused, failed) is shown as one.
  function asNotice(item, text) {
    item.className = "msg notice";
    item.querySelector(".who").textContent = "Note";
    renderText(item.querySelector(".body"), text);
  }

  // A note beside a reply, such as "reply cut off at the 400-token limit".
  function addNote(item, text) {
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = `(${text})`;
    item.append(note);
  }

  function addDivider(text) {
    const item = document.createElement("p");
    item.className = "divider";
    item.textContent = text;
    ui.messages.append(item);
  }

  function scrollDown() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function setStatus(text) {
    ui.status.textContent = text || "";
  }

  function personaName(name) {
    const found = state.personas.find((p) => p.name === name);
    return found ? found.display_name : name;
  }

  function updateHint() {
    const chosen = state.personas.find((p) => p.name === ui.persona.value);
    let hint = chosen && chosen.description ? chosen.description : "";
    if (state.threadPersona && chosen && chosen.name !== state.threadPersona) {
      hint = `Your next message switches this thread from ${personaName(state.threadPersona)} `
        + `to ${chosen.display_name}.`;
    }
    ui.hint.textContent = hint;
  }

  function setBusy(busy) {
    state.busy = busy;
    ui.send.disabled = busy;
    ui.reset.disabled = busy;
    ui.app.classList.toggle("busy", busy);
  }

  // --- personas and threads ------------------------------------------------------------------------

  async function loadPersonas() {
    const response = await api("/personas");
    if (!response.ok) throw new Error(await problem(response));
    state.personas = await response.json();
    ui.persona.replaceChildren(
      ...state.personas.map((p) => {
        const option = document.createElement("option");
        option.value = p.name;
        option.textContent = p.display_name;
        option.title = p.description;
        return option;
      }),
    );
    const saved = localStorage.getItem(PERSONA_KEY);
    if (saved && state.personas.some((p) => p.name === saved)) ui.persona.value = saved;
    updateHint();
  }

  async function refreshThreads() {
    const response = await api(`/users/${encodeURIComponent(state.user)}/threads`);
    if (!response.ok) {
      setStatus(await problem(response));
      return [];
    }
    const threads = await response.json();
    ui.threads.replaceChildren(
      ...threads.map((thread) => {
        const item = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.className = "thread";
        button.dataset.discussion = thread.discussion_id;
        if (thread.discussion_id === state.discussion) button.setAttribute("aria-current", "true");
        const title = document.createElement("span");
        title.className = "title";
        title.textContent = thread.title || "(untitled)";
        const meta = document.createElement("span");
        meta.className = "meta";
        meta.textContent = `${personaName(thread.persona)} · ${new Date(thread.updated_at * 1000).toLocaleString()}`;
        button.append(title, meta);
        button.addEventListener("click", () => openThread(thread.discussion_id));
        item.append(button);
        return item;
      }),
    );
    ui.noThreads.hidden = threads.length > 0;
    return threads;
  }

  function showThreads(open) {
    ui.app.classList.toggle("threads-open", open);
    ui.toggle.setAttribute("aria-expanded", String(open));
  }

  function newThread() {
    state.discussion = `d-${Date.now().toString(36)}-${randomHex(3)}`;
    state.threadPersona = null;
    localStorage.setItem(THREAD_KEY, state.discussion);
    ui.messages.replaceChildren();
    for (const button of ui.threads.querySelectorAll("button[aria-current]")) {
      button.removeAttribute("aria-current");
    }
    updateHint();
    setStatus("");
    showThreads(false);
    ui.input.focus();
  }

  async function openThread(discussion) {
    const path = `/users/${encodeURIComponent(state.user)}/threads/${encodeURIComponent(discussion)}/messages`;
    const response = await api(path);
    if (!response.ok) {
      setStatus(await problem(response));
      return false;
    }
    const thread = await response.json();
    state.discussion = discussion;
    state.threadPersona = thread.persona;
    localStorage.setItem(THREAD_KEY, discussion);
    if (thread.persona && state.personas.some((p) => p.name === thread.persona)) {
      ui.persona.value = thread.persona;
    }
    ui.messages.replaceChildren();
    const messages = thread.messages;
    messages.forEach((message, index) => {
      // "/advisor sql question" is logged, then "question" again: show the switch as a divider.
      const switched = message.role === "user" && /^\/advisor\s+(\S+)\s*([\s\S]*)$/.exec(message.text.trim());
      if (switched) {
        addDivider(`Persona: ${personaName(switched[1].toLowerCase())}`);
        const next = messages[index + 1];
        if (!switched[2] || (next && next.role === "user" && next.text.trim() === switched[2].trim())) return;
      }
      const command = message.role === "user" && message.text.trim().startsWith("/");
      addMessage(message.role, message.text, command ? "command" : "");
    });
    for (const button of ui.threads.querySelectorAll("button.thread")) {
      if (button.dataset.discussion === discussion) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
    updateHint();
    setStatus("");
    showThreads(false);
    if (thread.writing) followReply(discussion); // reloaded mid-reply: read along
    return true;
  }

  // A reply still being written (the page was reloaded, or opened elsewhere): show it as it grows.
  async function followReply(discussion) {
    const path = `/users/${encodeURIComponent(state.user)}/threads/${encodeURIComponent(discussion)}/live`;
    const reply = addMessage("assistant", "", "streaming");
    const body = reply.querySelector(".body");
    setBusy(true);
    setStatus("Raven is writing…");
    let shown = "";
    try {
      const response = await api(path, { headers: { Accept: "text/event-stream" } });
      if (response.status === 204) {
        reply.remove(); // it finished meanwhile: the log has it
        await openThread(discussion);
        return;
      }
      if (!response.ok) throw new Error(await problem(response));
      await readEvents(response, (name, data) => {
        if (name === "token") {
          shown += data.text;
          renderText(body, shown);
          scrollDown();
        } else if (name === "done") {
          renderText(body, data.generated_text || "(no reply)");
          if (data.notice) addNote(reply, data.notice);
        } else if (name === "error") {
          asNotice(reply, data.detail);
        }
      });
    } catch (error) {
      asNotice(reply, `The connection failed: ${error.message}`);
    } finally {
      reply.classList.remove("streaming");
      reply.dataset.state = "done";
      setBusy(false);
      setStatus("");
    }
  }

  // --- sending ---------------------------------------------------------------------------------------

  async function send(text) {
    if (state.busy || !text.trim()) return;
    if (!state.discussion) newThread();
    setBusy(true);
    setStatus("Raven is writing…");
    addMessage("user", text, text.trim().startsWith("/") ? "command" : "");
    const reply = addMessage("assistant", "", "streaming");
    const body = reply.querySelector(".body");
    let shown = "";
    let failed = false;
    try {
      const response = await api("/generate-response/stream", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({
          user_message: text,
          user_id: state.user,
          discussion_id: state.discussion,
          prompt_file: ui.persona.value || undefined,
        }),
      });
      if (!response.ok) {
        // busy (503), refused (422), failed (500): a notice from the server, not Raven's words
        failed = true;
        asNotice(reply, await problem(response));
        return;
      }
      await readEvents(response, (name, data) => {
        if (name === "token") {
          shown += data.text;
          renderText(body, shown);
          scrollDown();
        } else if (name === "error") {
          failed = true;
          renderText(body, shown + (shown ? "\n\n" : "") + data.detail);
        } else if (name === "done" && !failed) {
          shown = data.generated_text;
          renderText(body, shown || "(no reply)");
          if (data.notice) addNote(reply, data.notice);
        }
      });
    } catch (error) {
      failed = true;
      renderText(body, `${shown}${shown ? "\n\n" : ""}The connection failed: ${error.message}`);
    } finally {
      reply.classList.remove("streaming");
      reply.classList.toggle("error", failed);
      reply.dataset.state = "done";
      setBusy(false);
      setStatus("");
      scrollDown();
    }
    const threads = await refreshThreads();
    const current = threads.find((t) => t.discussion_id === state.discussion);
    state.threadPersona = current ? current.persona : state.threadPersona;
    updateHint();
  }

  // --- wiring --------------------------------------------------------------------------------------

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.input.value;
    if (!text.trim() || state.busy) return;
    ui.input.value = "";
    send(text);
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.persona.addEventListener("change", () => {
    localStorage.setItem(PERSONA_KEY, ui.persona.value);
    updateHint();
  });
  ui.newThread.addEventListener("click", newThread);
  ui.reset.addEventListener("click", () => {
    if (state.threadPersona) send("/reset");
    else setStatus("Nothing to reset yet: this thread has no messages.");
  });
  ui.toggle.addEventListener("click", (event) => {
    event.stopPropagation();
    showThreads(!ui.app.classList.contains("threads-open"));
  });
  // On a phone the list lies over the chat: a tap beside it or Escape puts it away.
  document.querySelector(".chat").addEventListener("click", () => showThreads(false));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") showThreads(false);
  });

  async function start() {
    try {
      await loadPersonas();
      const threads = await refreshThreads();
      const saved = localStorage.getItem(THREAD_KEY);
      if (!(saved && threads.some((t) => t.discussion_id === saved) && (await openThread(saved)))) {
        newThread();
      }
      document.body.dataset.ready = "true";
    } catch (error) {
      setStatus(`Could not load: ${error.message}`);
    }
  }

  start();
})();
