// Raven's chat page: plain JavaScript, no build step, nothing loaded from elsewhere.
// It talks to the same server's API (the README's web section): personas, the user's threads, a thread's
// messages, and POST /generate-response/stream, read as Server-Sent Events with fetch().
// Finished replies arrive as HTML the server rendered from Markdown and sanitised (adapters/web_markdown.py);
// everything else is put in the page as text.
"use strict";

(() => {
  const USER_KEY = "raven.userId";
  const THREAD_KEY = "raven.discussionId";
  const PERSONA_KEY = "raven.persona";
  const ID_PATTERN = /^[A-Za-z0-9_.@-]{1,64}$/;
  const PHONE = window.matchMedia("(max-width: 720px)");

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: $("app"),
    sidebar: $("sidebar"),
    threads: $("threads"),
    noThreads: $("no-threads"),
    noMatches: $("no-matches"),
    search: $("thread-search"),
    signOut: $("sign-out"),
    newThread: $("new-thread"),
    toggle: $("toggle-threads"),
    persona: $("persona"),
    hint: $("persona-hint"),
    reset: $("reset"),
    messages: $("messages"),
    announce: $("announce"),
    status: $("status"),
    form: $("composer"),
    input: $("message"),
    send: $("send"),
    stop: $("stop"),
    rename: $("rename"),
    remove: $("delete"),
    fork: $("fork"),
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
    threads: [],
    busy: false,
    following: false, // reading along a reply this page did not ask for (followReply)
  };

  // --- talking to the server ---------------------------------------------------------------------

  class Unreachable extends Error {}

  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    let response;
    try {
      response = await fetch(path, { credentials: "same-origin", ...options, headers });
    } catch {
      throw new Unreachable("Raven's server cannot be reached. Is it running? Try again in a moment.");
    }
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
      let chunk;
      try {
        chunk = await reader.read();
      } catch {
        throw new Unreachable("The connection to Raven's server broke off.");
      }
      const { value, done } = chunk;
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

  // Text only (never innerHTML): line breaks kept, ``` fences as code blocks. For replies being
  // written and for notices.
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

  async function copy(button, text) {
    const label = button.textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = label; }, 1500);
  }

  function copyButton(className, label, text) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = className;
    button.textContent = "Copy";
    button.setAttribute("aria-label", label);
    button.addEventListener("click", () => copy(button, typeof text === "function" ? text() : text));
    return button;
  }

  const replyTexts = new WeakMap(); // each shown reply's Markdown, for its Copy button

  // A finished reply: the server's sanitised HTML, a Copy button on each code block and on the reply.
  // ``replyId``: its message id when the thread's context holds it, so it can be forked from.
  function showReply(item, text, html, replyId) {
    const body = item.querySelector(".body");
    body.classList.add("markdown");
    body.innerHTML = html; // rendered and sanitised by the server (nh3): no script, no handlers
    for (const pre of body.querySelectorAll("pre")) {
      const code = pre.querySelector("code") || pre;
      pre.append(copyButton("copy-code", "Copy this code", () => code.textContent));
    }
    replyTexts.set(item, text);
    let actions = item.querySelector(".actions");
    if (!actions) {
      actions = document.createElement("div");
      actions.className = "actions";
      actions.append(copyButton("copy", "Copy this reply", () => replyTexts.get(item)),
        actionButton("retry", "Retry", "A new reply to the same message", "/retry"),
        actionButton("continue", "Continue", "Make this reply longer", "/continue"));
      item.append(actions);
    }
    if (replyId != null && !actions.querySelector(".fork")) {
      item.dataset.replyId = String(replyId);
      const fork = document.createElement("button");
      fork.type = "button";
      fork.className = "fork";
      fork.textContent = "Fork";
      fork.title = "A new thread that starts from this reply (this thread is unchanged)";
      fork.disabled = state.busy;
      fork.addEventListener("click", () => guarded(() => forkThread(replyId)));
      actions.append(fork);
    }
    lastReplyOnly();
  }

  function actionButton(className, label, title, command) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = className;
    button.textContent = label;
    button.title = title;
    button.disabled = state.busy;
    button.addEventListener("click", () => guarded(() => send(command)));
    return button;
  }

  // Retry and Continue act on the thread's last reply: only that one offers them.
  function lastReplyOnly() {
    const replies = [...ui.messages.querySelectorAll(".msg.assistant")];
    replies.forEach((reply, index) => {
      for (const button of reply.querySelectorAll(".retry, .continue")) button.hidden = index !== replies.length - 1;
    });
  }

  function timeElement(seconds) {
    const when = new Date(seconds * 1000);
    const time = document.createElement("time");
    time.dateTime = when.toISOString();
    time.title = when.toLocaleString();
    const today = new Date().toDateString() === when.toDateString();
    time.textContent = today
      ? when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : when.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
    return time;
  }

  const ROLE_NAMES = { user: "You", assistant: "Raven", notice: "Notice" };

  function addMessage(role, text, options = {}) {
    const item = document.createElement("article");
    item.className = `msg ${role}` + (options.extraClass ? ` ${options.extraClass}` : "");
    if (role === "notice") item.setAttribute("role", "note");
    const who = document.createElement("div");
    who.className = "who";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = ROLE_NAMES[role] || role;
    who.append(name, timeElement(options.at ?? Date.now() / 1000));
    const body = document.createElement("div");
    body.className = "body";
    body.dir = "auto"; // Arabic, Hebrew: laid out right to left
    item.append(who, body);
    // in the list first: showReply decides, among the replies listed, which is the last one
    (options.after ? options.after.after(item) : ui.messages.append(item));
    if (options.html != null) showReply(item, text, options.html, options.replyId);
    else renderText(body, text);
    scrollDown();
    return item;
  }

  // Busy, refused, failed, unreachable: said by the page or the server, not by Raven.
  function addNotice(text, after) {
    return addMessage("notice", text, { after });
  }

  // A note beside a reply, such as "reply cut off at the 400-token limit".
  function addNote(item, text) {
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = `(${text})`;
    item.querySelector(".body").after(note);
  }

  function addDivider(text) {
    const item = document.createElement("p");
    item.className = "divider";
    item.textContent = text;
    ui.messages.append(item);
    scrollDown();
  }

  function scrollDown() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function setStatus(text) {
    ui.status.textContent = text || "";
  }

  // Screen readers hear a reply once, when it is finished (not every token).
  function announce(text) {
    ui.announce.textContent = text.length > 400 ? `${text.slice(0, 400)}…` : text;
  }

  function personaName(name) {
    const found = state.personas.find((p) => p.name === name);
    return found ? found.display_name : name;
  }

  function updateHint() {
    const chosen = state.personas.find((p) => p.name === ui.persona.value);
    const about = chosen && chosen.description ? `${chosen.description.replace(/\.*$/, "")}. ` : "";
    ui.hint.textContent = state.threadPersona
      ? `${about}The persona of this thread: choosing another starts the thread over with it (the log is kept).`
      : `${about}Your first message starts this thread with ${chosen ? chosen.display_name : "this persona"}.`;
  }

  function setBusy(busy) {
    state.busy = busy;
    ui.send.disabled = busy;
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.reset.disabled = busy;
    ui.rename.disabled = busy;
    ui.remove.disabled = busy;
    ui.fork.disabled = busy;
    for (const button of ui.messages.querySelectorAll(".retry, .continue, .fork")) button.disabled = busy;
    ui.persona.disabled = busy;
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

  function threadItem(thread) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thread";
    button.dataset.discussion = thread.discussion_id;
    if (thread.discussion_id === state.discussion) button.setAttribute("aria-current", "true");
    const title = document.createElement("span");
    title.className = "title";
    title.dir = "auto";
    title.textContent = thread.title || "(untitled)";
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${personaName(thread.persona)} · ${new Date(thread.updated_at * 1000).toLocaleString()}`;
    button.append(title, meta);
    if (thread.forked_from) {
      const origin = document.createElement("span");
      origin.className = "meta forked";
      origin.dir = "auto";
      origin.textContent = `Fork of ${threadTitle(thread.forked_from)}`;
      button.append(origin);
    }
    button.addEventListener("click", () => guarded(() => openThread(thread.discussion_id)));
    item.append(button);
    return item;
  }

  function threadTitle(discussion) {
    const found = state.threads.find((t) => t.discussion_id === discussion);
    return found ? `“${found.title || "(untitled)"}”` : "a thread that is gone";
  }

  function showThreadList() {
    ui.threads.replaceChildren(...state.threads.map(threadItem));
    ui.noThreads.hidden = state.threads.length > 0;
    filterThreads();
  }

  function filterThreads() {
    const query = ui.search.value.trim().toLowerCase();
    let shown = 0;
    for (const item of ui.threads.children) {
      const title = item.querySelector(".title").textContent.toLowerCase();
      item.hidden = Boolean(query) && !title.includes(query);
      if (!item.hidden) shown += 1;
    }
    ui.noMatches.hidden = !query || shown > 0 || state.threads.length === 0;
  }

  async function refreshThreads() {
    const response = await api(`/users/${encodeURIComponent(state.user)}/threads`);
    if (!response.ok) {
      setStatus(await problem(response));
      return state.threads;
    }
    state.threads = await response.json();
    showThreadList();
    return state.threads;
  }

  // A thread just sent to is listed at once, before its reply (the server's list follows).
  function listNow(title) {
    if (state.threads.some((t) => t.discussion_id === state.discussion)) return;
    const now = Date.now() / 1000;
    state.threads.unshift({ discussion_id: state.discussion, persona: ui.persona.value,
      title: title.trim().split("\n")[0].slice(0, 120), created_at: now, updated_at: now, pending: true });
    showThreadList();
  }

  // ... and unlisted again when the message was not kept.
  function unlistPending() {
    state.threads = state.threads.filter((t) => !t.pending);
    showThreadList();
  }

  // On a phone the list is a drawer: closed, it is out of sight and out of the tab order.
  function showThreads(open) {
    ui.app.classList.toggle("threads-open", open);
    ui.toggle.setAttribute("aria-expanded", String(open));
    ui.sidebar.inert = PHONE.matches && !open;
  }

  function markCurrent() {
    for (const button of ui.threads.querySelectorAll("button.thread")) {
      if (button.dataset.discussion === state.discussion) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
  }

  function newThread() {
    state.discussion = `d-${Date.now().toString(36)}-${randomHex(3)}`;
    state.threadPersona = null;
    localStorage.setItem(THREAD_KEY, state.discussion);
    ui.messages.replaceChildren();
    markCurrent();
    updateHint();
    setStatus("");
    showThreads(false);
    ui.input.focus();
  }

  function showHistory(messages) {
    messages.forEach((message, index) => {
      // "/advisor sql question" is logged, then "question" again: show the switch as a divider.
      const switched = message.role === "user" && /^\/advisor\s+(\S+)\s*([\s\S]*)$/.exec(message.text.trim());
      if (switched) {
        addDivider(`Persona: ${personaName(switched[1].toLowerCase())}`);
        const next = messages[index + 1];
        if (!switched[2] || (next && next.role === "user" && next.text.trim() === switched[2].trim())) return;
      }
      const command = message.role === "user" && message.text.trim().startsWith("/");
      addMessage(message.role, message.text, { extraClass: command ? "command" : "", at: message.created_at,
        html: message.role === "assistant" ? message.html : undefined,
        replyId: message.role === "assistant" && message.in_context ? message.id : undefined });
    });
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
    followPersona();
    ui.messages.replaceChildren();
    if (thread.forked_from) addDivider(`Forked from ${threadTitle(thread.forked_from)}`);
    showHistory(thread.messages);
    markCurrent();
    updateHint();
    setStatus("");
    showThreads(false);
    if (thread.writing) guarded(() => followReply(discussion)); // reloaded mid-reply: read along
    return true;
  }

  // The picker shows the open thread's persona (also after a typed /advisor).
  function followPersona() {
    if (state.threadPersona && state.personas.some((p) => p.name === state.threadPersona)) {
      ui.persona.value = state.threadPersona;
    }
  }

  // A reply still being written (the page was reloaded, or opened elsewhere): show it as it grows.
  async function followReply(discussion) {
    const path = `/users/${encodeURIComponent(state.user)}/threads/${encodeURIComponent(discussion)}/live`;
    const reply = addMessage("assistant", "", { extraClass: "streaming" });
    const body = reply.querySelector(".body");
    state.following = true;
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
          showReply(reply, data.generated_text, data.html || "<p>(no reply)</p>", data.reply_id);
          if (data.notice) addNote(reply, data.notice);
          announce(`Raven: ${data.generated_text}`);
        } else if (name === "error") {
          addNotice(data.detail, reply);
        }
      });
    } catch (error) {
      addNotice(error.message, reply);
    } finally {
      reply.classList.remove("streaming");
      reply.dataset.state = "done";
      state.following = false;
      setBusy(false);
      setStatus("");
    }
  }

  // --- sending ---------------------------------------------------------------------------------------

  // Puts a message that got no reply back in the box, unless something new was typed meanwhile.
  function keepDraft(text) {
    if (!ui.input.value.trim()) ui.input.value = text;
  }

  async function send(text) {
    if (state.busy || !text.trim()) return;
    if (!state.discussion) newThread();
    setBusy(true);
    setStatus("Raven is writing…");
    const asked = addMessage("user", text, { extraClass: text.trim().startsWith("/") ? "command" : "" });
    listNow(text);
    const reply = addMessage("assistant", "", { extraClass: "streaming" });
    const body = reply.querySelector(".body");
    let shown = "";
    let forkedTo = null; // a typed /fork: the new thread, opened once the answer is shown
    let streamed = false; // the server took the message (so the list and the thread are read again)
    try {
      let response;
      try {
        response = await api("/generate-response/stream", {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
          body: JSON.stringify({
            user_message: text,
            user_id: state.user,
            discussion_id: state.discussion,
            prompt_file: ui.persona.value || undefined,
          }),
        });
      } catch (error) {
        reply.remove();
        unlistPending();
        addNotice(`${error.message} Your message is back in the box.`);
        keepDraft(text);
        return;
      }
      if (!response.ok) {
        // busy (503), refused (422), failed (500): a notice from the server, not Raven's words
        const detail = await problem(response);
        reply.remove();
        if (response.status < 500) asked.remove(); // refused: it was not kept
        addNotice(`${detail} Your message is back in the box.`);
        keepDraft(text);
        unlistPending();
        if (response.status >= 500) await refreshThreads(); // busy: kept in the log, marked failed
        return;
      }
      streamed = true;
      await refreshThreads(); // the message is stored now: the thread is listed with its title
      await readEvents(response, (name, data) => {
        if (name === "token") {
          shown += data.text;
          renderText(body, shown);
          scrollDown();
        } else if (name === "error") {
          addNotice(data.detail, reply);
        } else if (name === "done") {
          shown = data.generated_text;
          showReply(reply, shown, data.html || "<p>(no reply)</p>", data.reply_id);
          if (data.notice) addNote(reply, data.notice);
          announce(`Raven: ${shown}`);
          if (data.thread) forkedTo = data.thread.discussion_id;
        }
      });
    } catch (error) {
      addNotice(error.message, reply);
    } finally {
      if (!shown && reply.isConnected && !replyTexts.has(reply)) reply.remove();
      reply.classList.remove("streaming");
      reply.dataset.state = "done";
      try {
        if (streamed) await settle(text);
      } catch (error) {
        addNotice(error.message);
      } finally {
        if (!state.following) { // the re-read found a reply under way (another tab): that one reads along
          setBusy(false);
          setStatus("");
        }
        scrollDown();
      }
    }
    if (forkedTo) await openThread(forkedTo);
  }

  // Still busy meanwhile: a Retry or Continue re-renders the thread, and a click on a button that is
  // being replaced would be lost (the buttons stay disabled until the thread is shown as the log has it).
  async function settle(text) {
    await refreshThreads();
    const current = state.threads.find((t) => t.discussion_id === state.discussion);
    if (current) state.threadPersona = current.persona;
    followPersona();
    updateHint();
    if (/^\/(retry|continue)\s*$/.test(text.trim())) await openThread(state.discussion); // as the log has it now
  }

  // Fork: a new thread that starts where this one is now, or at one of its replies; it opens at once.
  async function forkThread(atReply) {
    if (!state.threadPersona) {
      setStatus("Nothing to fork yet: this thread has no messages.");
      return;
    }
    if (state.busy) return;
    setBusy(true);
    let thread = null;
    try {
      const response = await threadCall("/fork", { method: "POST", ...JSON_BODY(atReply == null ? {} : { at_reply: atReply }) });
      if (response.ok) thread = await response.json();
    } finally {
      setBusy(false);
    }
    if (!thread) return;
    await refreshThreads();
    await openThread(thread.discussion_id);
    announce(`Forked into a new thread: ${thread.title || thread.discussion_id}`);
  }

  async function threadCall(suffix, options) {
    const path = `/users/${encodeURIComponent(state.user)}/threads/${encodeURIComponent(state.discussion)}${suffix}`;
    const response = await api(path, options);
    if (!response.ok && response.status !== 204) addNotice(await problem(response));
    return response;
  }

  const JSON_BODY = (body) => ({ headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

  // Stop: what was written is kept as the reply.
  async function stopReply() {
    await threadCall("/stop", { method: "POST", ...JSON_BODY({}) });
  }

  async function renameThread() {
    if (!state.threadPersona) {
      setStatus("Nothing to rename yet: this thread has no messages.");
      return;
    }
    const current = state.threads.find((t) => t.discussion_id === state.discussion);
    const title = window.prompt("Rename this thread", current ? current.title : "");
    if (title === null) return;
    const response = await threadCall("", { method: "PATCH", ...JSON_BODY({ title }) });
    if (response.ok) await refreshThreads();
  }

  async function deleteThread() {
    if (!state.threadPersona) {
      setStatus("Nothing to delete yet: this thread has no messages.");
      return;
    }
    if (!window.confirm("Delete this thread? Its whole log and saved state are removed; this cannot be undone.")) {
      return;
    }
    const response = await threadCall("", { method: "DELETE" });
    if (response.ok || response.status === 204) {
      newThread();
      await refreshThreads();
    }
  }

  // The picker changes the open thread's persona now, shown in the thread (the core's /advisor).
  async function switchPersona(name) {
    localStorage.setItem(PERSONA_KEY, name);
    if (!state.threadPersona || state.threadPersona === name) {
      updateHint();
      return;
    }
    setBusy(true);
    try {
      const response = await api("/generate-response", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user_message: `/advisor ${name}`, user_id: state.user,
          discussion_id: state.discussion }),
      });
      if (!response.ok) {
        addNotice(await problem(response));
        followPersona();
        return;
      }
      state.threadPersona = name;
      addDivider(`Persona: ${personaName(name)} (the thread starts over; earlier messages stay in the log)`);
      await refreshThreads();
    } catch (error) {
      addNotice(error.message);
      followPersona();
    } finally {
      setBusy(false);
      updateHint();
    }
  }

  // Every handler runs through here: nothing is left as an unhandled rejection.
  function guarded(work) {
    Promise.resolve().then(work).catch((error) => addNotice(error.message));
  }

  // --- wiring --------------------------------------------------------------------------------------

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.input.value;
    if (!text.trim() || state.busy) return;
    ui.input.value = "";
    guarded(() => send(text));
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.persona.addEventListener("change", () => guarded(() => switchPersona(ui.persona.value)));
  ui.search.addEventListener("input", filterThreads);
  ui.stop.addEventListener("click", () => guarded(stopReply));
  ui.rename.addEventListener("click", () => guarded(renameThread));
  ui.remove.addEventListener("click", () => guarded(deleteThread));
  ui.fork.addEventListener("click", () => guarded(() => forkThread(null)));
  ui.newThread.addEventListener("click", newThread);
  ui.reset.addEventListener("click", () => {
    if (state.threadPersona) guarded(() => send("/reset"));
    else setStatus("Nothing to reset yet: this thread has no messages.");
  });
  ui.toggle.addEventListener("click", (event) => {
    event.stopPropagation();
    const open = !ui.app.classList.contains("threads-open");
    showThreads(open);
    if (open) ui.search.focus();
  });
  // On a phone the list lies over the chat: a tap beside it or Escape puts it away.
  document.querySelector(".chat").addEventListener("click", () => showThreads(false));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && ui.app.classList.contains("threads-open")) {
      showThreads(false);
      ui.toggle.focus();
    }
  });
  PHONE.addEventListener("change", () => showThreads(false));
  ui.signOut.hidden = document.body.dataset.auth !== "token";

  async function start() {
    showThreads(false);
    try {
      await loadPersonas();
      const threads = await refreshThreads();
      const saved = localStorage.getItem(THREAD_KEY);
      if (!(saved && threads.some((t) => t.discussion_id === saved) && (await openThread(saved)))) {
        newThread();
      }
    } catch (error) {
      addNotice(`Could not load: ${error.message}`);
    }
    document.body.dataset.ready = "true";
  }

  start();
})();
