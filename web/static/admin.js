// The admin dashboard: live sessions pushed over SSE (GET /admin/events), each row's agent output
// (GET /admin/sessions/{id}/logs), its plot (plots.js: a click on its id) and a Kill button that asks first.
// The admin token is asked for once and kept in sessionStorage; it goes as a Bearer token.
"use strict";

(function () {
  const TOKEN_KEY = "corral_admin_token";
  const $ = (id) => document.getElementById(id);
  const rows = new Map(); // key -> row data (ids are per tenant: the key is tenant/id, a bare id for "default")
  const logs = new Map(); // key -> {lines, error} of each open Logs panel
  const keyOf = (r) => (r.tenant === "default" ? r.session_id : `${r.tenant}/${r.session_id}`);
  // The admin routes name a session by its id and its tenant.
  const sessionPath = (r, tail = "") => `/admin/sessions/${encodeURIComponent(r.session_id)}${tail}?tenant=${encodeURIComponent(r.tenant)}`;
  let controller = null;
  let attempt = 0;
  let locked = false; // no (or a refused) admin token: nothing is listed until one is given

  const token = () => sessionStorage.getItem(TOKEN_KEY);
  const authHeaders = () => (token() ? { Authorization: `Bearer ${token()}` } : {});

  function setStatus(text) {
    $("status").textContent = text;
    $("status").dataset.state = text;
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").classList.toggle("hidden", !text);
  }

  function bytes(n) {
    // three digits at most ("900K", "1.0M", "22.4M"), so the columns keep their width: an agent's
    // USS near 1 MiB once printed as "1000.0K" and pushed the Kill button out of a 1280-pixel window
    if (n === null || n === undefined) return "–";
    const units = ["B", "K", "M", "G"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1024; i++; }
    return i ? `${n.toFixed(n >= 100 ? 0 : 1)}${units[i]}` : `${n}B`;
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    s = Math.floor(s);
    return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`
      : `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  }

  // A session's limit that something enforces, else null (no limit, or none this host can enforce:
  // the server's start-up log says why). Each is {limit, mechanism} in the row's `limits`.
  function limit(r, name) {
    const l = (r.limits || {})[name];
    return !l || l.mechanism === "none" || l.mechanism === "unavailable" ? null : l.limit;
  }

  // "3/64": in use / the limit; just the use without a limit, "–" for what is not known.
  function usedOf(used, most) {
    const u = used ?? "–";
    return most == null ? String(u) : `${u}/${most}`;
  }

  function render() {
    const body = $("sessions").querySelector("tbody");
    const sorted = [...rows.values()].sort((a, b) => (b.rss_bytes || 0) - (a.rss_bytes || 0) || a.session_id.localeCompare(b.session_id));
    const columns = $("sessions").querySelectorAll("thead th").length;
    body.replaceChildren(...sorted.flatMap((r) => [renderRow(r),
      ...(CorralPlots.isOpen(keyOf(r)) ? [CorralPlots.sessionRow(keyOf(r), columns)] : []),
      ...(logs.has(keyOf(r)) ? [renderLogs(r)] : [])]));
    const total = sorted.reduce((sum, r) => sum + (r.rss_bytes || 0), 0);
    $("totals").textContent = locked ? "" : `${sorted.length} live · ${bytes(total)} RSS`;
    $("empty").classList.toggle("hidden", locked || sorted.length > 0);
  }

  function renderRow(r) {
    const tr = document.createElement("tr");
    tr.dataset.sessionId = r.session_id;
    tr.dataset.tenant = r.tenant;
    tr.dataset.state = r.state;
    const idle = r.idle_seconds === undefined ? null : r.idle_seconds + (Date.now() - r.seenAt) / 1000;
    const cells = [r.session_id, r.tenant, r.pid ?? "–", r.state, seconds(r.state === "idle" ? idle : 0),
      bytes(r.rss_bytes), bytes(r.uss_bytes), r.cpu_percent == null ? "–" : r.cpu_percent.toFixed(1),
      limit(r, "cpu") ?? "–", usedOf(r.processes, limit(r, "pids")), usedOf(r.open_fds, limit(r, "open_files")),
      r.message_count ?? 0, r.restarts ?? 0, r.node ?? "–"];
    cells.forEach((value, i) => {
      const td = document.createElement("td");
      td.textContent = value;
      if (i === 0) { // cut with an ellipsis when long; a click opens (or closes) its plot
        Object.assign(td, { className: "sid opens", title: r.session_id });
        td.setAttribute("aria-expanded", String(CorralPlots.isOpen(keyOf(r))));
        td.addEventListener("click", () => CorralPlots.toggle(keyOf(r), sessionPath(r, "/timeline"), render));
      }
      tr.appendChild(td);
    });
    const td = document.createElement("td");
    const logsButton = document.createElement("button");
    logsButton.className = "logs";
    logsButton.textContent = logs.has(keyOf(r)) ? "Hide logs" : "Logs";
    logsButton.setAttribute("aria-expanded", String(logs.has(keyOf(r))));
    logsButton.addEventListener("click", () => toggleLogs(keyOf(r)));
    const kill = document.createElement("button");
    kill.className = "danger kill";
    kill.textContent = "Kill";
    kill.disabled = r.state === "stopping";
    kill.addEventListener("click", () => killSession(keyOf(r)));
    td.append(logsButton, kill);
    tr.appendChild(td);
    return tr;
  }

  // The row under a session that shows its agent's last lines of stdout/stderr.
  function renderLogs(r) {
    const panel = logs.get(keyOf(r));
    const tr = document.createElement("tr");
    tr.className = "logs-row";
    tr.dataset.logsFor = r.session_id;
    const td = document.createElement("td");
    td.colSpan = $("sessions").querySelectorAll("thead th").length;
    const pre = document.createElement("pre");
    pre.className = "logs";
    if (panel.error) pre.textContent = panel.error;
    else if (!panel.lines) pre.textContent = "loading…";
    else if (!panel.lines.length) pre.textContent = "(no output kept for this session)";
    else pre.textContent = panel.lines.map((l) => `${new Date(l.time * 1000).toISOString()} ${l.pid} ${l.stream} ${l.line}`).join("\n");
    const refresh = document.createElement("button");
    refresh.textContent = "Refresh";
    refresh.addEventListener("click", () => loadLogs(keyOf(r)));
    td.append(pre, refresh);
    tr.appendChild(td);
    return tr;
  }

  function toggleLogs(key) {
    if (logs.has(key)) {
      logs.delete(key);
      render();
    } else {
      logs.set(key, {});
      render();
      loadLogs(key);
    }
  }

  async function loadLogs(key) {
    let panel;
    try {
      const response = await fetch(sessionPath(rows.get(key), "/logs"), { headers: authHeaders() });
      const data = await response.json().catch(() => ({}));
      panel = response.ok ? { lines: data.lines } : { error: `logs: ${(data.error && data.error.message) || response.status}` };
    } catch (error) {
      panel = { error: `logs: ${error.message}` };
    }
    if (logs.has(key)) logs.set(key, panel); // unless it was closed meanwhile
    render();
  }

  // fields: at least session_id and tenant
  function merge(fields) {
    const key = keyOf(fields);
    const row = rows.get(key) || {};
    Object.assign(row, fields, { seenAt: Date.now() });
    rows.set(key, row);
  }

  function handle(event) {
    const d = event.data || {};
    switch (event.type) {
      case "sessions":
        rows.clear();
        for (const r of d.sessions) merge(r);
        break;
      case "state":
        if (["starting", "idle", "busy", "stopping"].includes(d.state)) {
          merge({ session_id: d.session_id, state: d.state, tenant: d.tenant, pid: d.pid ?? rows.get(keyOf(d))?.pid,
                  ...(d.state === "idle" ? { idle_seconds: 0 } : {}) });
        } else {
          rows.delete(keyOf(d));
        }
        break;
      case "spawned":
        merge({ session_id: d.session_id, pid: d.pid, tenant: d.tenant });
        break;
      case "end":
        rows.delete(keyOf(d));
        break;
      case "figures":
        for (const [key, figures] of Object.entries(d.figures)) if (rows.has(key)) Object.assign(rows.get(key), figures);
        break;
    }
    render();
  }

  async function killSession(key) {
    const row = rows.get(key) || {};
    if (!window.confirm(`Kill session ${row.session_id} (tenant ${row.tenant ?? "?"}, pid ${row.pid ?? "?"})? Its turn in progress is lost.`)) return;
    showError("");
    row.state = "stopping";
    render();
    const response = await fetch(sessionPath(row), { method: "DELETE", headers: authHeaders() });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      showError(`kill ${row.session_id}: ${(data.error && data.error.message) || response.status}`);
    }
  }

  // Locked: say the dashboard needs the admin token (and why the server refused), list nothing.
  function askForToken(message) {
    if (controller) controller.abort();
    locked = true;
    rows.clear();
    logs.clear();
    $("sessions").classList.add("hidden");
    CorralPlots.stop();
    $("login").classList.remove("hidden");
    $("login-error").textContent = message || "";
    setStatus("locked");
    render();
    $("token").focus();
  }

  // Keep the event stream open; reconnect with backoff; a 401 asks for the token.
  function connect() {
    if (controller) controller.abort();
    const mine = (controller = new AbortController());
    locked = false;
    $("login").classList.add("hidden");
    $("sessions").classList.remove("hidden");
    $("logout").classList.toggle("hidden", !token());
    (async () => {
      while (!mine.signal.aborted) {
        setStatus("connecting");
        try {
          await CorralSSE.readStream("/admin/events", {
            headers: authHeaders(),
            signal: mine.signal,
            onOpen: () => { attempt = 0; setStatus("live"); CorralPlots.start(authHeaders, render); },
            onEvent: handle,
          });
        } catch (error) {
          if (mine.signal.aborted) return;
          if (error.status === 401) {
            const refused = token() !== null;
            sessionStorage.removeItem(TOKEN_KEY);
            const said = error.body && error.body.error && error.body.error.message;
            askForToken(refused ? "That token was refused." : said ? `The server says: ${said}.` : "");
            return;
          }
        }
        if (mine.signal.aborted) return;
        setStatus("offline");
        await new Promise((resolve) => setTimeout(resolve, CorralSSE.backoff(attempt++)));
      }
    })();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    connect();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken("");
  });
  setInterval(render, 1000); // only ticks the idle clocks locally; data comes from the stream
  connect();
})();
