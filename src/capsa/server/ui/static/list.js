// The live sandbox list: rows pushed by /ui/api/events (server-sent events), updated in place
// (a row is rebuilt only when its data changed), ages and times left counted here each second.
// window.capsaListStats records what each update cost (bench/ui.py and the tests read it).
"use strict";
(function () {
  const ui = window.capsaUi;
  const stats = { updates: 0, lastMs: 0, maxMs: 0, totalMs: 0, rows: 0, firstSeen: {} };
  window.capsaListStats = stats;
  window.capsaList = { render: (items) => render(items) }; // bench/ui.py times a 100-row update
  let source = null;
  const rows = new Map(); // id -> {tr, json}

  function url() {
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(document.getElementById("filters"))) if (v) params.set(k, v);
    const query = params.toString();
    return "/ui/api/events" + (query ? "?" + query : "");
  }

  function connect() {
    if (source) source.close();
    const live = document.getElementById("live");
    source = new EventSource(url());
    source.addEventListener("open", () => { live.classList.add("on"); live.textContent = "● live"; });
    source.addEventListener("sandboxes", (event) => render(JSON.parse(event.data).sandboxes));
    source.addEventListener("ended", () => { location.href = "/ui/login"; });
    source.addEventListener("error", () => {
      live.classList.remove("on"); live.textContent = "○ reconnecting";
      if (source.readyState === EventSource.CLOSED) check();
    });
  }

  // A stream refused outright: a bad filter (400) or no session (401).
  async function check() {
    const response = await fetch(url(), { credentials: "same-origin" });
    if (response.status === 401) { location.href = "/ui/login"; return; }
    if (!response.ok) {
      const error = document.getElementById("error");
      error.hidden = false;
      try { error.textContent = (await response.json()).message; } catch (e) { error.textContent = response.statusText; }
    }
    if (response.body) response.body.cancel();
  }

  function cells(item) {
    const el = ui.el;
    const link = el("a", { href: "/ui/sandboxes/" + encodeURIComponent(item.id) }, el("code", { text: item.id }));
    const state = el("span", { class: "state " + item.state, text: item.state });
    const cpu = el("td", { class: "cpu" });
    cpu.append(ui.sparkline(item.cpuHistory, 100, 60, 18, "cpu"), item.cpu === null ? "–" : item.cpu.toFixed(1) + "%");
    const mem = el("td", { class: "mem" });
    mem.append(ui.sparkline(item.memHistory, item.memTotal || 1, 60, 18, "mem"), ui.bytes(item.mem));
    const meta = Object.entries(item.metadata).map(([k, v]) => k + "=" + v).join(" ");
    const actions = el("td", { class: "row-actions" });
    const pause = item.state === "running" ? "pause" : "resume";
    for (const [action, label] of [[pause, pause === "pause" ? "Pause" : "Resume"], ["extend", "+5m"], ["kill", "Kill"]]) {
      const button = el("button", { type: "button", "data-action": action, text: label });
      if (action === "kill") button.className = "danger";
      if (action === "extend" && item.state !== "running") button.disabled = true;
      actions.append(button);
    }
    return [
      el("td", {}, link), el("td", { text: item.template }), el("td", {}, state),
      el("td", { class: "age" }), el("td", { class: "left" }), cpu, mem,
      el("td", { class: "denials", text: item.denials === null ? "–" : String(item.denials) }),
      el("td", { class: "meta", text: meta }), actions,
    ];
  }

  function render(items) {
    const started = performance.now();
    const body = document.querySelector("#sandboxes tbody");
    const seen = new Set();
    let previous = null;
    for (const item of items) {
      seen.add(item.id);
      const json = JSON.stringify(item);
      let row = rows.get(item.id);
      if (!row) {
        row = { tr: ui.el("tr", { "data-id": item.id }), json: "" };
        rows.set(item.id, row);
        stats.firstSeen[item.id] = Date.now();
      }
      if (row.json !== json) {
        row.tr.replaceChildren(...cells(item));
        row.json = json;
        row.item = item;
        tick(row);
      }
      const wanted = previous ? previous.nextSibling : body.firstChild;
      if (wanted !== row.tr) body.insertBefore(row.tr, wanted);
      previous = row.tr;
    }
    for (const [id, row] of rows) if (!seen.has(id)) { row.tr.remove(); rows.delete(id); }
    document.getElementById("count").textContent = "(" + items.length + ")";
    document.getElementById("empty").hidden = items.length > 0;
    const spent = performance.now() - started;
    stats.updates += 1; stats.lastMs = spent; stats.totalMs += spent; stats.rows = items.length;
    stats.maxMs = Math.max(stats.maxMs, spent);
  }

  function tick(row) {
    const now = Date.now() / 1000;
    row.tr.querySelector(".age").textContent = ui.duration(now - row.item.started);
    row.tr.querySelector(".left").textContent = row.item.state === "running" ? ui.duration(row.item.end - now) : "–";
  }

  async function act(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const id = button.closest("tr").dataset.id;
    const action = button.dataset.action;
    if (action === "kill" && !window.confirm("Kill sandbox " + id + "?")) return;
    button.disabled = true;
    const error = document.getElementById("error");
    try {
      await ui.post(`/ui/api/sandboxes/${encodeURIComponent(id)}/${action}`, action === "extend" ? { seconds: 300 } : undefined);
      error.hidden = true;
    } catch (e) {
      error.hidden = false; error.textContent = `${action} ${id}: ${e.message}`;
    } finally { button.disabled = false; }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const form = document.getElementById("filters");
    let timer = null;
    form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(connect, 300); });
    form.addEventListener("submit", (e) => { e.preventDefault(); connect(); });
    document.querySelector("#sandboxes tbody").addEventListener("click", act);
    setInterval(() => { for (const row of rows.values()) tick(row); }, 1000);
    connect();
  });
  window.addEventListener("pagehide", () => { if (source) source.close(); });
})();
