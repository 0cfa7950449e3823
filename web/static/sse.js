// Server-Sent Events over fetch(), so a stream can carry an Authorization header and
// Last-Event-ID, and the caller decides how to reconnect (EventSource can do neither).
"use strict";

window.CorralSSE = (function () {
  // Read one event stream until it ends; calls onOpen(response) then onEvent({id, type, data}).
  // Resolves when the server closes the stream; rejects on a network error or a non-200 answer
  // (the error carries .status and .body).
  async function readStream(url, { headers = {}, signal, onOpen, onEvent } = {}) {
    const response = await fetch(url, { headers: { Accept: "text/event-stream", ...headers }, signal, cache: "no-store" });
    if (!response.ok) {
      const error = new Error(`stream answered ${response.status}`);
      error.status = response.status;
      try { error.body = await response.json(); } catch (_) { error.body = null; }
      throw error;
    }
    if (onOpen) onOpen(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const event = parseBlock(block);
        if (event) onEvent(event);
      }
    }
  }

  // One "field: value" block of the text/event-stream format; comments and retry-only blocks give null.
  function parseBlock(block) {
    let id = null, type = "message", data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") id = value;
      else if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return null;
    let parsed;
    try { parsed = JSON.parse(data.join("\n")); } catch (_) { parsed = data.join("\n"); }
    return { id, type, data: parsed };
  }

  // Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped at 15 s.
  function backoff(attempt) {
    const base = Math.min(15000, 500 * 2 ** attempt);
    return base / 2 + Math.random() * base / 2;
  }

  return { readStream, parseBlock, backoff };
})();
