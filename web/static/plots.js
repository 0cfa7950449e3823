// The dashboard's plots, drawn with uPlot (shipped in /static/vendor/uplot/, no CDN):
// this node's last hour (GET /admin/timeline: live sessions, memory, CPU, turns a second, ends by
// reason), usage by tenant over a chosen period (GET /admin/usage), and a session's memory and CPU
// over its life (GET /admin/sessions/{id}/timeline?tenant=) under its row. They refresh once per sampling
// interval of the server (--usage-interval), the pace at which the data changes.
// window.corralPlots holds the charts and the data they were drawn from (the browser test reads it).
"use strict";

const CorralPlots = (function () {
  const $ = (id) => document.getElementById(id);
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  const NODE_CHARTS = [
    ["live", "Live sessions", ""], ["memory_mib", "Agent memory", " MiB"],
    ["cpu_cores", "CPU", " cores"], ["turns_per_s", "Turns", "/s"],
  ];
  const state = { charts: {}, node: null, tenants: null, tenantChart: null, sessions: {}, paths: {}, sessionCharts: {} };
  let headers = () => ({});
  let timer = null;
  let generation = 0; // a stop (or a new start) ends the refresh loop of the previous start
  let interval = 10;

  function chart(title, names, data, target, { unit = "", time = true, bars = false, labels = null } = {}) {
    const series = [{}].concat(names.map((name, i) => ({
      label: name, stroke: COLORS[i % COLORS.length], width: 1.5,
      ...(bars ? { fill: COLORS[i % COLORS.length] + "99", paths: uPlot.paths.bars({ size: [0.6, 60] }) } : {}),
      value: (u, v) => (v == null ? "–" : `${+v.toFixed(3)}${unit}`),
    })));
    const axes = [
      labels ? { values: (u, splits) => splits.map((i) => labels[i] ?? "") } : {},
      { size: 60, values: (u, splits) => splits.map((v) => `${+v.toFixed(2)}`) },
    ];
    const opts = {
      title, width: Math.max(260, target.clientWidth || 320), height: 170, series, axes,
      scales: { x: labels ? { time: false, range: [-0.5, Math.max(labels.length - 0.5, 0.5)] } : { time } },
      legend: { live: true },
    };
    return new uPlot(opts, data, target);
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: headers() });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((body.error && body.error.message) || String(response.status));
    return body;
  }

  // ---- the node's (in a cluster: every node's) last hour ------------------------------------
  async function loadNode() {
    const data = await getJSON("/admin/timeline");
    state.node = data;
    interval = data.interval || interval;
    const nodes = data.cluster || [data]; // a series per node, their times aligned by uPlot.join
    const several = nodes.length > 1;
    $("node-title").textContent = several ? `The cluster (${nodes.length} nodes), last hour` : "This node, last hour";
    const box = $("node-charts");
    for (const [key, title, unit] of NODE_CHARTS) {
      const names = several ? nodes.map((n) => n.node) : [title];
      draw(key, title, names, joined(nodes.map((n) => [n.t, n[key]])), box, unit);
    }
    const ends = nodes.flatMap((n) => Object.keys(n.ends).sort().map((r) => [several ? `${n.node} ${r}` : r, n.t, n.ends[r]]));
    const endsColumns = ends.length ? joined(ends.map(([, t, v]) => [t, v])) : [nodes[0].t];
    draw("ends", "Ends by reason", ends.map(([name]) => name), endsColumns, box, "");
  }

  function joined(tables) {
    return tables.length === 1 ? tables[0] : uPlot.join(tables);
  }

  // Update a chart in place, or make it again when its series changed (a new reason, a node came or went).
  function draw(key, title, names, columns, box, unit) {
    const old = state.charts[key];
    if (old && old.series.length - 1 === names.length && names.every((n, i) => old.series[i + 1].label === n)) {
      old.setData(columns);
      return;
    }
    if (old) old.destroy();
    state.charts[key] = chart(title, names, columns, cell(box, key, true), { unit });
  }

  function cell(box, key, empty = false) {
    let div = box.querySelector(`[data-chart="${key}"]`);
    if (!div) {
      div = document.createElement("div");
      div.className = "chart";
      div.dataset.chart = key;
      box.appendChild(div);
    } else if (empty) {
      div.replaceChildren();
    }
    return div;
  }

  // ---- usage by tenant -----------------------------------------------------------------------
  async function loadTenants() {
    const since = $("period").value;
    const data = await getJSON(`/admin/usage?since=${encodeURIComponent(since)}`);
    state.tenants = data;
    const names = Object.keys(data.tenants).sort();
    const columns = [names.map((_, i) => i), names.map((t) => data.tenants[t].cpu_seconds),
      names.map((t) => data.tenants[t].memory_mib_seconds / 3600), names.map((t) => data.tenants[t].turns)];
    if (state.tenantChart) state.tenantChart.destroy();
    const box = $("tenant-chart");
    box.replaceChildren();
    state.tenantChart = chart(`Usage by tenant, since ${since}`, ["CPU seconds", "Memory MiB·h", "Turns"],
      columns, box, { bars: true, labels: names });
    renderTenantTable(names, data.tenants);
  }

  function renderTenantTable(names, tenants) {
    const fields = ["starts", "turns", "messages_in", "messages_out", "cpu_seconds", "memory_mib_seconds",
      "memory_peak_bytes", "egress_bytes", "ends"];
    const body = $("tenant-usage").querySelector("tbody");
    body.replaceChildren(...names.map((t) => {
      const tr = document.createElement("tr");
      tr.dataset.tenant = t;
      for (const value of [t, ...fields.map((f) => tenants[t][f])]) {
        const td = document.createElement("td");
        td.textContent = typeof value === "number" && !Number.isInteger(value) ? value.toFixed(2) : value;
        tr.appendChild(td);
      }
      return tr;
    }));
  }

  // ---- a session's life, under its row ------------------------------------------------------
  // A session is named by its key (its id, or tenant/id: two tenants may use one id) and read from
  // the path the dashboard gives (its timeline route with ?tenant=).
  function isOpen(key) {
    return key in state.sessions;
  }

  function toggle(key, path, rerender) {
    if (isOpen(key)) {
      delete state.sessions[key];
      delete state.paths[key];
      if (state.sessionCharts[key]) state.sessionCharts[key].destroy();
      delete state.sessionCharts[key];
      rerender();
    } else {
      state.sessions[key] = null;
      state.paths[key] = path;
      rerender();
      loadSession(key).finally(rerender);
    }
  }

  async function loadSession(key) {
    try {
      state.sessions[key] = await getJSON(state.paths[key]);
    } catch (error) {
      state.sessions[key] = { error: `timeline: ${error.message}` };
    }
    if (state.sessionCharts[key]) state.sessionCharts[key].destroy();
    delete state.sessionCharts[key];
  }

  // The row under a session's row: its memory and CPU since it started (a chart made once per load).
  function sessionRow(key, colSpan) {
    const tr = document.createElement("tr");
    tr.className = "plot-row";
    tr.dataset.plotFor = key;
    const td = document.createElement("td");
    td.colSpan = colSpan;
    const data = state.sessions[key];
    if (!data || data.error) {
      td.textContent = data ? data.error : "loading…";
    } else {
      const box = document.createElement("div");
      box.className = "chart";
      td.appendChild(box);
      requestAnimationFrame(() => {
        if (state.sessionCharts[key]) state.sessionCharts[key].destroy();
        state.sessionCharts[key] = chart(`${key}: memory (MiB) and CPU (cores) over its life`,
          ["Memory MiB", "CPU cores"], [data.t, data.memory_mib, data.cpu_cores], box);
      });
    }
    tr.appendChild(td);
    return tr;
  }

  // ---- refreshing ----------------------------------------------------------------------------
  async function refresh(rerender) {
    try {
      await Promise.all([loadNode(), loadTenants(), ...Object.keys(state.sessions).map(loadSession)]);
      $("plots-error").textContent = "";
    } catch (error) {
      $("plots-error").textContent = `plots: ${error.message}`;
    }
    if (Object.keys(state.sessions).length) rerender();
  }

  function start(authHeaders, rerender) {
    headers = authHeaders;
    stop();
    const mine = generation;
    $("plots").classList.remove("hidden");
    const tick = async () => {
      await refresh(rerender);
      if (mine === generation) timer = setTimeout(tick, interval * 1000);
    };
    $("period").onchange = () => loadTenants().catch((error) => { $("plots-error").textContent = `plots: ${error.message}`; });
    tick();
  }

  function stop() {
    generation += 1;
    if (timer) clearTimeout(timer);
    timer = null;
    $("plots").classList.add("hidden");
  }

  window.corralPlots = state;
  return { start, stop, toggle, isOpen, sessionRow };
})();
