"use strict";
// The chat page: sessions on the left, the conversation, the context meter and the last
// reply's figures, a composer. Everything goes through the session API (/api/...), the same
// session files as the terminal chat.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "localbot-api-key";
const state = {
  session: null,
  streaming: false,
  key: sessionStorage.getItem(KEY_STORE) || "",
};

// ------------------------------------------------------------------ the API
async function api(method, path, body) {
  const headers = {};
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const init = { method: method, headers: headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    await askForKey();
    return api(method, path, body);
  }
  return response;
}

async function apiJson(method, path, body) {
  const response = await api(method, path, body);
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

function sessionPath(id, rest) {
  return "/api/sessions/" + encodeURIComponent(id) + (rest || "");
}

// The key is asked once per tab and kept in sessionStorage (not sent anywhere but here).
function askForKey() {
  return new Promise(function (resolve) {
    const dialog = $("key-dialog");
    $("key-form").onsubmit = function () {
      state.key = $("key-input").value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ------------------------------------------------------------------ sessions
async function loadSessions() {
  const data = await apiJson("GET", "/api/sessions");
  const list = $("sessions");
  list.replaceChildren();
  const sessions = data.sessions.slice();
  if (state.session && !sessions.some((s) => s.id === state.session)) {
    sessions.unshift({ id: state.session, messages: 0 });
  }
  for (const info of sessions) {
    const item = document.createElement("li");
    item.dataset.id = info.id;
    item.title = info.problem || info.id;
    item.textContent = info.id;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = info.messages === null ? "corrupt" : String(info.messages);
    item.append(count);
    if (info.id === state.session) item.classList.add("current");
    item.addEventListener("click", () => switchTo(info.id));
    list.append(item);
  }
}

async function switchTo(id) {
  if (state.streaming) return;
  state.session = id;
  delete document.body.dataset.session;
  history.replaceState(null, "", "#s=" + encodeURIComponent(id));
  $("session-title").textContent = id;
  document.body.classList.remove("sidebar-open");
  showError("");
  for (const item of $("sessions").children) {
    item.classList.toggle("current", item.dataset.id === id);
  }
  await Promise.all([loadHistory(), loadSettings(), loadFigures()]);
  document.body.dataset.session = id; // loaded (tests wait for this)
  $("input").focus();
}

async function loadHistory() {
  const data = await apiJson("GET", sessionPath(state.session, "/messages"));
  const box = $("messages");
  box.replaceChildren();
  for (const m of data.messages) addMessage(m.role, m.content, m.interrupted);
  box.scrollTop = box.scrollHeight;
}

async function newSession() {
  const name = prompt("Name of the new session (empty: named by date)");
  if (name === null) return;
  try {
    const data = await apiJson("POST", "/api/sessions", name.trim() ? { id: name.trim() } : {});
    state.session = data.id;
    await loadSessions();
    await switchTo(data.id);
  } catch (err) {
    showError(err.message);
  }
}

async function renameSession() {
  const name = prompt("New name for " + state.session, state.session);
  if (!name || name.trim() === state.session) return;
  try {
    const data = await apiJson("PATCH", sessionPath(state.session), { id: name.trim() });
    state.session = data.id;
    await loadSessions();
    await switchTo(data.id);
  } catch (err) {
    showError(err.message);
  }
}

async function deleteSession() {
  if (!confirm("Delete the session " + state.session + " and its history?")) return;
  try {
    await apiJson("DELETE", sessionPath(state.session));
    state.session = null;
    const data = await apiJson("GET", "/api/sessions");
    const next = data.sessions.length ? data.sessions[0].id : "default";
    state.session = next;
    await loadSessions();
    await switchTo(next);
  } catch (err) {
    showError(err.message);
  }
}

// ------------------------------------------------------------------ settings
async function loadSettings() {
  const data = await apiJson("GET", sessionPath(state.session, "/settings"));
  $("system-prompt").value = data.system || "";
  $("variables").value = Object.entries(data.vars || {})
    .map(([k, v]) => k + "=" + v)
    .join("\n");
  $("settings-status").textContent = "";
}

async function saveSettings() {
  const vars = {};
  for (const line of $("variables").value.split("\n")) {
    if (!line.trim()) continue;
    const at = line.indexOf("=");
    if (at < 1) {
      $("settings-status").textContent = "each variable is name=value";
      return;
    }
    vars[line.slice(0, at).trim()] = line.slice(at + 1);
  }
  try {
    await apiJson("PUT", sessionPath(state.session, "/settings"), {
      system: $("system-prompt").value,
      vars: vars,
    });
    $("settings-status").textContent = "saved";
    await loadFigures();
  } catch (err) {
    $("settings-status").textContent = err.message;
  }
}

// ------------------------------------------------------------------ figures
async function loadFigures() {
  const [tokens, stats] = await Promise.all([
    apiJson("GET", sessionPath(state.session, "/tokens")),
    apiJson("GET", sessionPath(state.session, "/stats")),
  ]);
  showTokens(tokens);
  showStats(stats);
}

// The same numbers as the REPL's /tokens.
function showTokens(t) {
  const meter = $("context-meter");
  meter.max = Math.max(1, t.prompt_budget);
  meter.low = 0.6 * meter.max; // the trim watermark's neighbourhood: yellow, then red near full
  meter.high = 0.9 * meter.max;
  meter.value = Math.min(t.prompt_tokens, meter.max);
  let next = "nothing is trimmed";
  if (t.next_turn.error) next = t.next_turn.error;
  else if (t.next_turn.dropped) next = "the oldest " + t.next_turn.dropped + " messages are left out";
  $("meter-text").textContent =
    t.prompt_tokens + " of " + t.prompt_budget + " prompt tokens (" + t.percent + "%) · " +
    t.messages + " messages · context " + t.context_window + " = budget + reply " +
    t.reply_budget + " · next turn: " + next;
}

// The same figures as the REPL's /stats.
function showStats(s) {
  if (!s || s.prompt_tokens === undefined) {
    $("stats-text").textContent = "no reply yet";
    return;
  }
  let text =
    "last reply: first token " + s.time_to_first_token_s.toFixed(2) + " s · prompt " +
    s.prompt_tokens + " tokens (" + s.cached_tokens + " from cache, " + s.evaluated_tokens +
    " evaluated at " + Math.round(s.prompt_tokens_per_s) + " tok/s) · reply " +
    s.output_tokens + " tokens at " + s.generation_tokens_per_s.toFixed(1) + " tok/s (" +
    s.finish_reason + ")";
  if (s.kv_restored_tokens) {
    text += " · resumed " + s.kv_restored_tokens + " tokens of KV state in " + s.kv_restore_ms + " ms";
  }
  $("stats-text").textContent = text;
}

// ------------------------------------------------------------------ messages
function addMessage(role, content, interrupted) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  fillMessage(div, content, interrupted);
  $("messages").append(div);
  return div;
}

function fillMessage(div, content, interrupted) {
  if (div.classList.contains("assistant")) {
    div.innerHTML = window.renderMarkdown(content); // escaped inside, see markdown.js
    for (const pre of div.querySelectorAll("pre")) addCopyButton(pre);
  } else {
    div.textContent = content;
  }
  if (interrupted) {
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = "interrupted";
    div.append(mark);
  }
}

function addCopyButton(pre) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "copy";
  button.addEventListener("click", () => {
    navigator.clipboard.writeText(pre.querySelector("code").textContent).then(() => {
      button.textContent = "copied";
    });
  });
  pre.append(button);
}

function setStreaming(on) {
  state.streaming = on;
  $("send").hidden = on;
  $("stop").hidden = !on;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.streaming) return;
  showError("");
  $("input").value = "";
  const box = $("messages");
  addMessage("user", text, false);
  const reply = addMessage("assistant", "", false);
  reply.classList.add("streaming");
  box.scrollTop = box.scrollHeight;
  setStreaming(true);
  let content = "";
  let frame = 0; // a redraw is due at the next animation frame (at most one per frame)
  const draw = () => {
    frame = 0;
    fillMessage(reply, content, false);
    box.scrollTop = box.scrollHeight;
  };
  try {
    const response = await api("POST", sessionPath(state.session, "/messages"), { content: text });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || response.statusText);
    }
    await readEvents(response, function (event) {
      if (event.type === "queued" && event.ahead > 0) {
        reply.textContent = "waiting for the model: " + event.ahead + " request(s) ahead";
      } else if (event.type === "start") {
        reply.textContent = "";
      } else if (event.type === "token") {
        content += event.text;
        if (!frame) frame = requestAnimationFrame(draw);
      } else if (event.type === "done") {
        cancelAnimationFrame(frame); // the last tokens may come with "done": draw once, marked
        frame = 0;
        reply.classList.remove("streaming");
        fillMessage(reply, content, event.interrupted);
        showTokens(event.tokens);
        showStats(event.stats);
      } else if (event.type === "error") {
        throw new Error(event.message);
      }
    });
  } catch (err) {
    showError(err.message);
    if (!content) reply.remove();
  } finally {
    reply.classList.remove("streaming");
    setStreaming(false);
    loadSessions().catch(() => {});
  }
}

// Server-sent events from a fetch() body (EventSource cannot POST or send a header).
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6))
        .join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

async function stop() {
  try {
    await apiJson("POST", sessionPath(state.session, "/stop"), {});
  } catch (err) {
    showError(err.message);
  }
}

// ------------------------------------------------------------------ start
async function start() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    // Enter sends, Shift-Enter adds a line (and Enter while composing text in an IME does not).
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-session").addEventListener("click", newSession);
  $("rename-session").addEventListener("click", renameSession);
  $("delete-session").addEventListener("click", deleteSession);
  $("save-settings").addEventListener("click", saveSettings);
  $("toggle-settings").addEventListener("click", () => {
    $("settings").hidden = !$("settings").hidden;
  });
  $("toggle-sidebar").addEventListener("click", () => {
    document.body.classList.toggle("sidebar-open");
  });
  try {
    const info = await apiJson("GET", "/api/info");
    $("model-info").textContent =
      info.model + " · " + info.context_window + "-token context · localbot " + info.version;
    const fromUrl = new URLSearchParams(location.hash.slice(1)).get("s");
    const data = await apiJson("GET", "/api/sessions");
    state.session = fromUrl || (data.sessions.length ? data.sessions[0].id : info.default_session);
    await loadSessions();
    await switchTo(state.session);
    document.body.dataset.ready = "1"; // for tests: the page has loaded its session
  } catch (err) {
    showError(err.message);
  }
}

start();
