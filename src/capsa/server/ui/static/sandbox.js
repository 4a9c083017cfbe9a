// One sandbox's page: its state, facts and metrics chart and its egress log from
// /ui/api/sandboxes/{id}/events (server-sent events), its processes from the guest's ps, and
// the actions. When the sandbox ends the page says so and fires "capsa:sandbox-gone" on
// document (the terminal and the files listen for it).
"use strict";
(function () {
  const ui = window.capsaUi;
  const SVG = "http://www.w3.org/2000/svg";
  const EGRESS_KEPT = 500;
  const SAMPLES_KEPT = 3600; // as many as the server keeps per sandbox
  let id = null, source = null, current = null, gone = false;
  let samples = []; // the stream sends each metrics sample once: the page keeps the series

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  }

  // CPU % and memory % of the guest over the sampled window, hand-drawn in SVG.
  function chart(metrics) {
    const width = 640, height = 170, left = 34, bottom = 20, top = 8, right = 8;
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "CPU and memory" });
    const h = height - top - bottom, w = width - left - right;
    for (const pct of [0, 50, 100]) {
      const y = top + h - (pct / 100) * h;
      root.append(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "axis" }));
      const label = svg("text", { x: 2, y: y + 3 }); label.textContent = pct + "%"; root.append(label);
    }
    if (metrics.length > 1) {
      const t0 = metrics[0].timestampUnix, t1 = metrics[metrics.length - 1].timestampUnix;
      const span = Math.max(t1 - t0, 1);
      const x = (m) => (left + ((m.timestampUnix - t0) / span) * w).toFixed(1);
      const y = (pct) => (top + h - (Math.min(pct, 100) / 100) * h).toFixed(1);
      root.append(svg("polyline", { class: "cpu", points: metrics.map((m) => `${x(m)},${y(m.cpuUsedPct)}`).join(" ") }));
      root.append(svg("polyline", { class: "mem", points: metrics.map((m) => `${x(m)},${y(m.memTotal ? (100 * m.memUsed) / m.memTotal : 0)}`).join(" ") }));
      const from = svg("text", { x: left, y: height - 4 }); from.textContent = new Date(t0 * 1000).toLocaleTimeString();
      const to = svg("text", { x: width - right - 60, y: height - 4 }); to.textContent = new Date(t1 * 1000).toLocaleTimeString();
      root.append(from, to);
    }
    const legend = ui.el("p", { class: "muted" });
    const last = metrics[metrics.length - 1];
    legend.textContent = last
      ? `CPU ${last.cpuUsedPct.toFixed(1)}% (blue) · memory ${ui.bytes(last.memUsed)} of ${ui.bytes(last.memTotal)} (purple) · disk ${ui.bytes(last.diskUsed)} of ${ui.bytes(last.diskTotal)} · ${metrics.length} samples`
      : "No samples yet (the server samples each sandbox every few seconds).";
    document.getElementById("chart").replaceChildren(root, legend);
  }

  function facts(item) {
    const now = Date.now() / 1000;
    const rows = [
      ["Template", item.template], ["Tenant", item.tenant],
      ["Started", new Date(item.started * 1000).toLocaleString() + " (" + ui.duration(now - item.started) + " ago)"],
      ["Time left", item.state === "running" ? ui.duration(item.end - now) : "–"],
      ["Egress denials", item.denials === null ? "no network" : String(item.denials)],
      ["Metadata", Object.entries(item.metadata).map(([k, v]) => k + "=" + v).join(", ") || "–"],
    ];
    document.getElementById("facts").replaceChildren(...rows.flatMap(([k, v]) => [ui.el("dt", { text: k }), ui.el("dd", { text: v })]));
  }

  function show(item) {
    current = item;
    const state = document.getElementById("state");
    state.textContent = item.state; state.className = "state " + item.state;
    facts(item);
    const newest = samples.length ? samples[samples.length - 1].timestamp : "";
    const fresh = item.metrics.filter((m) => m.timestamp > newest); // a reconnected stream resends all
    if (fresh.length || !samples.length) {
      samples = samples.concat(fresh).slice(-SAMPLES_KEPT);
      chart(samples);
    }
    for (const button of document.querySelectorAll("#actions button")) {
      const action = button.dataset.action;
      button.hidden = (action === "pause" && item.state !== "running") || (action === "resume" && item.state !== "paused");
      button.disabled = action === "extend" && item.state !== "running";
    }
  }

  function egress(decisions) {
    const body = document.querySelector("#egress tbody");
    for (const d of decisions) {
      const dst = (d.domain ? d.domain + " " : "") + d.dst + (d.port ? ":" + d.port : "");
      const tr = ui.el("tr", { class: d.action === "deny" ? "deny" : "" },
        ui.el("td", { text: new Date(d.time * 1000).toLocaleTimeString() }), ui.el("td", { text: d.proto }),
        ui.el("td", { text: dst }), ui.el("td", { text: d.rule }), ui.el("td", { text: d.action }));
      body.prepend(tr);
    }
    while (body.children.length > EGRESS_KEPT) body.lastChild.remove();
    document.getElementById("egress-none").hidden = body.children.length > 0;
  }

  function ended() {
    if (gone) return;
    gone = true;
    if (source) source.close();
    const banner = document.getElementById("gone");
    banner.hidden = false;
    banner.textContent = "This sandbox has ended (killed, timed out or gone): nothing here is live any more.";
    const state = document.getElementById("state");
    state.textContent = "ended"; state.className = "state gone";
    for (const button of document.querySelectorAll("#actions button")) button.disabled = true;
    if (current) { current.state = "ended"; facts(current); }
    document.dispatchEvent(new CustomEvent("capsa:sandbox-gone", { detail: { id } }));
  }

  async function processes() {
    if (gone || document.hidden || !current || current.state !== "running") return;
    const response = await fetch(`/ui/api/sandboxes/${encodeURIComponent(id)}/processes`, { credentials: "same-origin" });
    if (!response.ok) return;
    const body = document.querySelector("#processes tbody");
    const rows = (await response.json()).processes.map((p) => ui.el("tr", {},
      ui.el("td", { text: String(p.pid) }), ui.el("td", { text: p.user }), ui.el("td", { text: ui.duration(p.seconds) }),
      ui.el("td", { text: ui.bytes(p.rss) }), ui.el("td", { text: p.command })));
    body.replaceChildren(...rows);
  }

  async function act(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    if (action === "kill" && !window.confirm("Kill sandbox " + id + "?")) return;
    button.disabled = true;
    const banner = document.getElementById("gone");
    try {
      await ui.post(`/ui/api/sandboxes/${encodeURIComponent(id)}/${action}`, action === "extend" ? { seconds: 300 } : undefined);
      if (action === "kill") ended();
    } catch (e) {
      banner.hidden = false; banner.textContent = `${action}: ${e.message}`;
    } finally { if (!gone) button.disabled = false; }
  }

  document.addEventListener("DOMContentLoaded", () => {
    id = document.querySelector("main").dataset.sandbox;
    source = new EventSource(`/ui/api/sandboxes/${encodeURIComponent(id)}/events`);
    source.addEventListener("sandbox", (e) => show(JSON.parse(e.data)));
    source.addEventListener("egress", (e) => egress(JSON.parse(e.data)));
    source.addEventListener("gone", ended);
    source.addEventListener("ended", () => { location.href = "/ui/login"; });
    source.addEventListener("error", async () => {
      if (source.readyState !== EventSource.CLOSED || gone) return;
      const r = await fetch(`/ui/api/sandboxes/${encodeURIComponent(id)}/events`, { credentials: "same-origin" });
      if (r.status === 401) location.href = "/ui/login"; else if (r.status === 404) ended();
      if (r.body) r.body.cancel();
    });
    document.getElementById("actions").addEventListener("click", act);
    document.getElementById("processes-refresh").addEventListener("click", processes);
    setInterval(() => { if (current && !gone) facts(current); }, 1000);
    setInterval(processes, 10000);
    setTimeout(processes, 300);
  });
  window.addEventListener("pagehide", () => { if (source) source.close(); });
})();
