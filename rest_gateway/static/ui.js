/*
 * The web chat page's script (rest_gateway/static/ui.html).
 *
 * Messages are markdown, rendered by marked and then sanitized by DOMPurify;
 * HTML written in a message is shown as text, never as markup. The page's
 * Content-Security-Policy runs no inline script whatever got through.
 * The conversations listed are the API's own (GET sessions, most recently
 * used first); the open one's id is kept in localStorage across reloads.
 */
"use strict";

const STORE = { session: "llamachat.sessionId", apiKey: "llamachat.apiKey" };
const TITLE_FETCHES = 4; // histories fetched at once for the titles of the list
const MAX_LISTED = 10000; // sessions listed at most (10 pages of the API's 1000)

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), message: $("message"), send: $("send"), stop: $("stop"),
  clear: $("clear"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  apiKey: $("api-key"), error: $("error"), session: $("session"), composer: $("composer"),
  newChat: $("new-chat"), conversations: $("conversations"), empty: $("conversations-empty"),
};

let sessionId = localStorage.getItem(STORE.session);
let streaming = null; // the AbortController of the reply being streamed
let conversations = []; // the API's session ids, most recently used first
const titles = new Map(); // session id -> its first kept user message
let listing = 0; // which listing of the conversations is the latest

/* ---------- Markdown ---------- */

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const markdown = new marked.Marked({
  gfm: true,
  breaks: true, // a chat's single newlines are line breaks
  renderer: {
    // HTML in a message is text to show, not markup to build.
    html({ text, block }) {
      return block ? `<p class="raw-html">${escapeHtml(text.replace(/\n+$/, ""))}</p>` : escapeHtml(text);
    },
    // Images become links: nothing a message says is fetched unless clicked.
    image({ href, text }) {
      return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`;
    },
  },
});

const SANITIZE = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "img", "svg", "math"],
  FORBID_ATTR: ["style", "id", "name"],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank"); // never navigate away from the chat
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** A message's markdown as sanitized DOM nodes, each code block with a Copy button. */
function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(markdown.parse(text).trim(), SANITIZE);
  for (const pre of fragment.querySelectorAll("pre")) {
    const wrapper = document.createElement("div");
    wrapper.className = "code";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    pre.replaceWith(wrapper);
    wrapper.append(pre, copy);
  }
  return fragment;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain HTTP from another host: the Clipboard API is not there.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("the browser did not copy");
}

async function copyCode(button) {
  const pre = button.parentElement.querySelector("pre");
  try {
    await copyText(pre.textContent);
    button.textContent = "Copied";
  } catch (error) {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

/* ---------- Messages ---------- */

/** An API failure, with the HTTP status (0 for a network failure). */
class ApiError extends Error {
  constructor(status, detail) {
    super(status ? `Error ${status}: ${detail}` : detail);
    this.status = status;
  }
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

/** Follow the newest text, unless the reader has scrolled up. */
function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
}

function scrollIfFollowing(follow) {
  if (follow) ui.messages.scrollTop = ui.messages.scrollHeight;
}

/** A message element; its markdown is kept as ``source``, shown rendered. */
function addMessage(role, text) {
  const follow = nearBottom();
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  el.append(content, meta);
  el.source = text;
  content.replaceChildren(renderMarkdown(text));
  ui.messages.append(el);
  scrollIfFollowing(follow);
  return el;
}

function render(el) {
  const follow = nearBottom();
  el.querySelector(".content").replaceChildren(renderMarkdown(el.source));
  scrollIfFollowing(follow);
}

/** Add streamed text; the markdown is rendered again at most once a frame. */
function appendText(el, text) {
  el.source += text;
  if (el.pendingRender) return;
  el.pendingRender = requestAnimationFrame(() => { el.pendingRender = 0; render(el); });
}

function finishRender(el) {
  if (el.pendingRender) cancelAnimationFrame(el.pendingRender);
  el.pendingRender = 0;
  render(el);
}

function setMeta(el, text) {
  el.querySelector(".meta").textContent = text;
}

/** "24 tokens · 85.1 tokens/s · first token 0.12 s · stop" */
function usageLine(tokens, finishReason, started, firstAt, doneAt) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  const rate = tokensPerSecond(tokens, firstAt, doneAt);
  if (rate !== null) parts.push(`${rate.toFixed(1)} tokens/s`);
  if (firstAt !== null) parts.push(`first token ${((firstAt - started) / 1000).toFixed(2)} s`);
  parts.push(finishReason);
  return parts.join(" · ");
}

/** The decode rate as this page saw it: the tokens after the first, over the
 * time from the first token's event to the last's. */
function tokensPerSecond(tokens, firstAt, doneAt) {
  if (firstAt === null || tokens < 2 || doneAt <= firstAt) return null;
  return (tokens - 1) / ((doneAt - firstAt) / 1000);
}

/* ---------- The API ---------- */

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** fetch, with network failures and non-2xx answers turned into ApiError. */
async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `Network error: ${error.message} (is the service running?)`);
  }
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return response;
}

/** The API's error text: {"detail": ...}, else the body, else the status text. */
async function detailOf(response) {
  const body = await response.text().catch(() => "");
  try {
    const detail = JSON.parse(body).detail;
    if (detail !== undefined) return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch (_) { /* not JSON */ }
  return body.trim() || response.statusText || "request failed";
}

/** The JSON payloads of the Server-Sent Events in a response body, as they arrive. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = done ? "" : blocks.pop();
      for (const block of blocks) {
        const data = block.split(/\r\n|\n|\r/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
        if (data.length) yield JSON.parse(data.join("\n"));
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {}); // the consumer stopped early: let the body go
  }
}

/** The sampling settings; an empty field is left to the API's default. */
function sampling() {
  const body = {};
  if (ui.temperature.value.trim() !== "") body.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value.trim() !== "") body.max_tokens = Number(ui.maxTokens.value);
  return body;
}

/* ---------- The conversation ---------- */

function setSession(id) {
  sessionId = id || null;
  if (sessionId) localStorage.setItem(STORE.session, sessionId);
  else localStorage.removeItem(STORE.session);
  ui.session.textContent = sessionId || "";
  markCurrent();
}

function setStreaming(controller) {
  streaming = controller;
  const busy = controller !== null;
  ui.send.disabled = busy;
  ui.clear.disabled = busy;
  ui.newChat.disabled = busy;
  ui.stop.hidden = !busy;
  ui.messages.setAttribute("aria-busy", String(busy));
  for (const button of ui.conversations.querySelectorAll("button")) button.disabled = busy;
}

async function send() {
  const message = ui.message.value;
  if (streaming || !message.trim()) return;
  hideError();
  const body = { message, ...sampling() };
  if (sessionId) body.session_id = sessionId;
  ui.message.value = "";
  const userEl = addMessage("user", message);
  let reply = null;
  const controller = new AbortController();
  setStreaming(controller);
  const started = performance.now();
  let firstAt = null;
  try {
    const response = await call("chat/stream", {
      method: "POST",
      headers: { ...headers(true), Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    reply = addMessage("assistant", "");
    reply.classList.add("streaming");
    let finished = false;
    for await (const event of sseEvents(response)) {
      if (event.error !== undefined) throw new ApiError(0, `Error: ${event.error}`);
      if (event.done) {
        finished = true;
        const doneAt = performance.now();
        finishRender(reply);
        reply.dataset.tokensUsed = event.tokens_used;
        reply.dataset.finishReason = event.finish_reason;
        const rate = tokensPerSecond(event.tokens_used, firstAt, doneAt);
        if (rate !== null) reply.dataset.tokensPerSecond = rate.toFixed(1);
        setMeta(reply, usageLine(event.tokens_used, event.finish_reason, started, firstAt, doneAt));
        if (!titles.has(event.session_id)) titles.set(event.session_id, titleOf(message));
        setSession(event.session_id);
        touchConversation(event.session_id);
        break;
      }
      if (event.token !== undefined) {
        if (firstAt === null) firstAt = performance.now();
        appendText(reply, event.token);
      }
    }
    if (!finished) throw new ApiError(0, "The reply stream ended before the reply was complete");
  } catch (error) {
    if (error.name === "AbortError") {
      if (reply) setMeta(reply, "stopped (not kept in the session)");
    } else {
      showError(error instanceof ApiError ? error.message : `Error: ${error.message}`);
      if (reply) setMeta(reply, "incomplete (not kept in the session)");
    }
    if (reply && reply.source === "") { reply.remove(); reply = null; }
    if (!reply) {
      userEl.classList.add("failed");
      if (!ui.message.value) ui.message.value = message; // to retry or edit
    }
  } finally {
    if (reply) { reply.classList.remove("streaming"); finishRender(reply); }
    setStreaming(null);
    ui.message.focus();
  }
}

/** Show the open session's history; a session that is gone starts afresh. */
async function restoreSession() {
  ui.session.textContent = sessionId || "";
  if (!sessionId) return;
  const restoring = sessionId;
  try {
    const response = await call(`sessions/${encodeURIComponent(restoring)}`, { headers: headers(false) });
    const session = await response.json();
    if (sessionId !== restoring || ui.messages.childElementCount) return; // moved on meanwhile
    for (const exchange of session.exchanges) {
      addMessage("user", exchange.user);
      addMessage("assistant", exchange.assistant);
    }
    if (session.exchanges.length) titles.set(restoring, titleOf(session.exchanges[0].user));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      if (sessionId === restoring) setSession(null);
    } else {
      showError(`Could not load the conversation: ${error.message}`);
    }
  }
}

function openConversation(id) {
  if (streaming || (id === sessionId && ui.messages.childElementCount)) {
    ui.message.focus();
    return;
  }
  hideError();
  ui.messages.replaceChildren();
  setSession(id);
  restoreSession();
  ui.message.focus();
}

function newConversation() {
  if (streaming) return;
  hideError();
  ui.messages.replaceChildren();
  setSession(null);
  ui.message.focus();
}

/** Forget a session in the API (POST chat/clear); true when it is gone. */
async function deleteConversation(id) {
  if (streaming) return false;
  hideError();
  try {
    await call("chat/clear", {
      method: "POST", headers: headers(true), body: JSON.stringify({ session_id: id }),
    });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) { // 404: already gone
      showError(error.message);
      return false;
    }
  }
  conversations = conversations.filter((other) => other !== id);
  titles.delete(id);
  if (id === sessionId) {
    ui.messages.replaceChildren();
    setSession(null);
  }
  renderConversations();
  return true;
}

/* ---------- The list of conversations ---------- */

function titleOf(message) {
  const line = message.trim().split("\n", 1)[0];
  return line.length > 80 ? `${line.slice(0, 79)}…` : line || "(empty)";
}

/** Fetch the list again (GET sessions, every page), then show it. */
async function loadConversations() {
  const mine = ++listing;
  const ids = [];
  let cursor = null;
  try {
    do {
      const query = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
      const response = await call(`sessions?limit=1000${query}`, { headers: headers(false) });
      const page = await response.json();
      ids.push(...page.sessions);
      cursor = page.next_cursor;
    } while (cursor && ids.length < MAX_LISTED);
  } catch (error) {
    if (mine !== listing) return;
    conversations = [];
    renderConversations(`Could not list the conversations: ${error.message}`);
    return;
  }
  if (mine !== listing) return; // a newer listing is on its way
  conversations = ids.reverse(); // the API lists the least recently used first
  renderConversations();
}

/** The open session was just used: first in the list. */
function touchConversation(id) {
  conversations = [id, ...conversations.filter((other) => other !== id)];
  renderConversations();
}

const titleQueue = [];
let titleFetches = 0;

/** Titles are fetched (the first kept message of each history) as items scroll into view. */
const titleWatcher = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    titleWatcher.unobserve(entry.target);
    const id = entry.target.dataset.sessionId;
    if (!titles.has(id) && !titleQueue.includes(id)) titleQueue.push(id);
  }
  fetchTitles();
}, { root: ui.conversations });

function fetchTitles() {
  while (titleFetches < TITLE_FETCHES && titleQueue.length) {
    const id = titleQueue.shift();
    titleFetches += 1;
    call(`sessions/${encodeURIComponent(id)}`, { headers: headers(false) })
      .then((response) => response.json())
      .then((session) => {
        if (session.exchanges.length) titles.set(id, titleOf(session.exchanges[0].user));
        showTitle(id);
      })
      .catch(() => {}) // gone meanwhile, or no key: the id stays shown
      .finally(() => { titleFetches -= 1; fetchTitles(); });
  }
}

function itemOf(id) {
  for (const item of ui.conversations.children) if (item.dataset.sessionId === id) return item;
  return null;
}

function showTitle(id) {
  const item = itemOf(id);
  if (!item) return;
  const title = titles.get(id) || id;
  item.querySelector(".open").textContent = title;
  item.querySelector(".delete").setAttribute("aria-label", `Delete conversation: ${title}`);
}

function markCurrent() {
  for (const item of ui.conversations.children) {
    const open = item.querySelector(".open");
    if (item.dataset.sessionId === sessionId) open.setAttribute("aria-current", "true");
    else open.removeAttribute("aria-current");
  }
}

/** Draw the list again, keeping the keyboard focus on the item it was on. */
function renderConversations(note) {
  const focused = document.activeElement;
  const focusedItem = ui.conversations.contains(focused) ? focused.closest("li") : null;
  const focusedId = focusedItem ? focusedItem.dataset.sessionId : null;
  const focusedIndex = focusedItem ? [...ui.conversations.children].indexOf(focusedItem) : -1;
  const focusedClass = focusedItem ? focused.className : null;

  titleWatcher.disconnect();
  const items = conversations.map((id) => {
    const item = document.createElement("li");
    item.dataset.sessionId = id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.title = id;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "\u00d7";
    open.disabled = remove.disabled = streaming !== null;
    item.append(open, remove);
    return item;
  });
  ui.conversations.replaceChildren(...items);
  for (const id of conversations) showTitle(id);
  for (const item of items) if (!titles.has(item.dataset.sessionId)) titleWatcher.observe(item);
  markCurrent();
  ui.empty.textContent = note || "No conversations yet.";
  ui.empty.hidden = !note && conversations.length > 0;

  if (focusedItem) { // the same item, or the one now in its place, or New chat
    const target = itemOf(focusedId) || items[Math.min(focusedIndex, items.length - 1)];
    if (target) target.querySelector(`.${focusedClass.split(" ")[0]}`).focus();
    else ui.newChat.focus();
  }
}

ui.conversations.addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  const id = button.closest("li").dataset.sessionId;
  if (button.classList.contains("open")) openConversation(id);
  else if (button.classList.contains("delete")) await deleteConversation(id);
});

/* ---------- Wiring ---------- */

ui.composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && streaming) streaming.abort();
});
ui.messages.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy");
  if (button) copyCode(button);
});
ui.stop.addEventListener("click", () => streaming && streaming.abort());
ui.newChat.addEventListener("click", newConversation);
ui.clear.addEventListener("click", async () => {
  if (sessionId) await deleteConversation(sessionId);
  else newConversation();
  ui.message.focus();
});
localStorage.removeItem(STORE.apiKey); // where an earlier version kept it
ui.apiKey.value = sessionStorage.getItem(STORE.apiKey) || "";
ui.apiKey.addEventListener("input", () => {
  const key = ui.apiKey.value.trim();
  if (key) sessionStorage.setItem(STORE.apiKey, key);
  else sessionStorage.removeItem(STORE.apiKey);
});
ui.apiKey.addEventListener("change", () => {
  // The key names the tenant: its own conversations, and a history that
  // could not be loaded without it can be now.
  titles.clear();
  loadConversations();
  if (!ui.messages.childElementCount && sessionId) { hideError(); restoreSession(); }
});
restoreSession();
loadConversations();
