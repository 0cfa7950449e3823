// The chat page's client: what the seeds' ChatManager does, against corral's API.
// It keeps its session id in localStorage and sends it on every call, streams replies over
// SSE (GET /api/chat/stream), reconnects with backoff (resuming with Last-Event-ID), interrupts
// the turn in progress, and starts new sessions. When the server wants an API key (a 401), the
// page shows a form for one (onNeedKey) and keeps it in localStorage "corral_api_key".
"use strict";

const STORAGE_KEY = "corral_session_id";
const KEY_STORAGE = "corral_api_key";

class ChatManager {
  constructor({ backendUrl = "", onMessages, onStatus, onError, onNeedKey } = {}) {
    this.backendUrl = backendUrl;
    this.onMessages = onMessages || (() => {});
    this.onStatus = onStatus || (() => {});
    this.onError = onError || (() => {});
    this.onNeedKey = onNeedKey || (() => {}); // called with the server's reason when it wants an API key
    this.sessionId = localStorage.getItem(STORAGE_KEY) || this.setSessionId(ChatManager.generateSessionId());
    this.messages = new Map(); // seq -> {seq, role, content}
    this.streaming = null; // {text} of the reply being streamed
    this.state = null;
    this.lastEventId = null;
    this.attempt = 0;
    this.controller = null;
    this.deltaCount = 0; // chunks received over the stream (the page shows them as they come)
  }

  static generateSessionId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, (c) => {
      const r = (Math.random() * 16) | 0;
      return (c === "x" ? r : (r & 0x3) | 0x8).toString(16);
    });
  }

  // Keep an API key (sent as a Bearer token from now on) and reconnect with it.
  setKey(key) {
    localStorage.setItem(KEY_STORAGE, key.trim());
    this.connect();
  }

  // The server refused us (401): forget a key it refused and ask the page for one.
  needKey(body) {
    const refused = localStorage.getItem(KEY_STORAGE) !== null;
    localStorage.removeItem(KEY_STORAGE);
    this.disconnect();
    this.onStatus("locked");
    this.onNeedKey(refused ? "That key was refused." : (body && body.error && body.error.message) || "");
  }

  getSessionId() { return this.sessionId; }

  setSessionId(sessionId) {
    this.sessionId = sessionId;
    localStorage.setItem(STORAGE_KEY, sessionId);
    return sessionId;
  }

  headers(extra = {}) {
    const key = localStorage.getItem(KEY_STORAGE);
    return { "X-Session-Id": this.sessionId, ...(key ? { Authorization: `Bearer ${key}` } : {}), ...extra };
  }

  // Keep one stream open, reconnecting with backoff until disconnect().
  connect() {
    this.disconnect();
    const controller = (this.controller = new AbortController());
    const sessionId = this.sessionId;
    const run = async () => {
      while (!controller.signal.aborted) {
        this.onStatus("connecting");
        try {
          const extra = this.lastEventId ? { "Last-Event-ID": this.lastEventId } : {};
          await CorralSSE.readStream(
            `${this.backendUrl}/api/chat/stream?session_id=${encodeURIComponent(sessionId)}`,
            {
              headers: this.headers(extra),
              signal: controller.signal,
              onOpen: () => { this.attempt = 0; this.onStatus(this.state || "ready"); },
              onEvent: (event) => this.handle(event),
            },
          );
        } catch (error) {
          if (controller.signal.aborted) return;
          if (error.status === 401) {
            this.needKey(error.body);
            return;
          }
        }
        if (controller.signal.aborted) return;
        this.onStatus("offline");
        await new Promise((resolve) => setTimeout(resolve, CorralSSE.backoff(this.attempt++)));
      }
    };
    run();
  }

  disconnect() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  }

  handle(event) {
    if (event.id) this.lastEventId = event.id;
    const data = event.data || {};
    switch (event.type) {
      case "state":
        if (Array.isArray(data.messages)) { // the snapshot sent on connect
          this.messages.clear();
          for (const m of data.messages) this.messages.set(m.seq, m);
          this.streaming = data.is_processing && this.streaming ? this.streaming : null;
          this.render();
        }
        this.state = data.state || this.state;
        this.onStatus(data.is_processing || data.state === "busy" ? "busy" : (data.state || "ready"));
        break;
      case "delta":
        this.deltaCount++;
        if (!this.streaming) this.streaming = { text: "" };
        this.streaming.text += data.text || "";
        this.render();
        break;
      case "message":
        this.messages.set(data.seq, data);
        // The stored reply replaces its streamed chunks; a new user turn drops what an
        // interrupted turn left streaming.
        if (data.role === "assistant" || data.role === "user") this.streaming = null;
        this.render();
        break;
      case "error":
        this.streaming = null;
        this.onError((data.message || data.code || "the agent failed").toString());
        this.render();
        break;
      case "end":
        this.streaming = null;
        this.onStatus(data.reason || "ended");
        this.render();
        break;
    }
  }

  render() {
    const list = [...this.messages.values()].sort((a, b) => a.seq - b.seq);
    if (this.streaming) list.push({ seq: Infinity, role: "assistant", content: this.streaming.text, streaming: true });
    this.onMessages(list);
  }

  async post(path, body) {
    const response = await fetch(`${this.backendUrl}${path}`, {
      method: "POST",
      headers: this.headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ ...body, session_id: this.sessionId }),
    });
    const data = await response.json().catch(() => ({}));
    if (response.status === 401) this.needKey(data);
    if (!response.ok) {
      const error = new Error((data.error && data.error.message) || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  // Send a user message; the reply streams in over the event stream.
  async sendMessage(message) {
    if (!message.trim()) return;
    this.onError("");
    await this.post("/api/chat", { message, wait: false });
  }

  async interrupt() {
    return this.post("/api/interrupt", {});
  }

  // Forget this conversation and start a fresh session.
  newSession() {
    this.setSessionId(ChatManager.generateSessionId());
    this.messages.clear();
    this.streaming = null;
    this.state = null;
    this.lastEventId = null;
    this.render();
    this.connect();
  }
}

// ------------------------------------------------------------------ the page

(function () {
  const $ = (id) => document.getElementById(id);
  const showError = (text) => { $("error").textContent = text; $("error").classList.toggle("hidden", !text); };

  const chat = new ChatManager({
    onMessages(list) {
      const box = $("messages");
      box.replaceChildren(...list.map((m) => {
        const div = document.createElement("div");
        div.className = `msg ${m.role}${m.streaming ? " streaming" : ""}`;
        div.dataset.role = m.role;
        div.textContent = m.content;
        return div;
      }));
      box.lastElementChild && box.lastElementChild.scrollIntoView({ block: "end" });
    },
    onStatus(state) {
      $("status").textContent = state;
      $("status").dataset.state = state;
      $("interrupt").disabled = state !== "busy";
      // Locked (the server wants an API key): nothing can be sent until one is given.
      $("send").disabled = $("input").disabled = state === "locked";
    },
    onError: showError,
    onNeedKey(reason) {
      $("key-reason").textContent = reason;
      $("key-form").classList.remove("hidden");
      $("api-key").focus();
    },
  });
  window.chatManager = chat; // for the console (and tests)
  $("session-id").textContent = chat.getSessionId();

  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("input").value;
    $("input").value = "";
    try { await chat.sendMessage(text); } catch (error) { if (error.status !== 401) showError(error.message); }
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    $("api-key").value = "";
    $("key-form").classList.add("hidden");
    showError("");
    chat.setKey(key);
  });
  $("interrupt").addEventListener("click", () => chat.interrupt().catch((e) => showError(e.message)));
  $("new-session").addEventListener("click", () => {
    chat.newSession();
    $("session-id").textContent = chat.getSessionId();
  });
  chat.connect();
})();
