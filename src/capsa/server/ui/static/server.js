// The server page: health, pools and their fill, templates and images, recent ends, refreshed
// every 5 seconds from /ui/api/server.
"use strict";
(function () {
  const ui = window.capsaUi;

  function table(selector, rows) {
    document.querySelector(selector + " tbody").replaceChildren(...rows.map((cells) =>
      ui.el("tr", {}, ...cells.map((c) => ui.el("td", { text: c === null || c === undefined ? "–" : String(c) })))));
  }

  async function load() {
    const response = await fetch("/ui/api/server", { credentials: "same-origin" });
    if (response.status === 401) { location.href = "/ui/login?next=/ui/server"; return; }
    if (!response.ok) return;
    const data = await response.json();
    const h = data.health;
    const streams = Object.entries(h.streams).map(([k, v]) => k + " " + v).join(", ") || "none";
    const facts = [
      ["Status", h.status], ["Up for", ui.duration(h.uptime)], ["Sandboxes running (all)", h.running],
      ["Yours (running + paused)", h.visible], ["Paused", h.paused],
      ["Max sandboxes", h.maxSandboxes === null ? "no cap" : h.maxSandboxes], ["Domain", h.domain],
      ["Dashboard streams", streams],
    ];
    document.getElementById("health").replaceChildren(...facts.flatMap(([k, v]) => [ui.el("dt", { text: k }), ui.el("dd", { text: String(v) })]));
    table("#pools", data.pools.map((p) => [p.template, p.size, p.ready === null ? "on the nodes" : p.ready + " / " + p.size]));
    if (!data.pools.length) table("#pools", [["no pools (--pool TEMPLATE=N)", "", ""]]);
    table("#templates", data.templates.map((t) => [t.name, t.kind, t.running]));
    const none = document.getElementById("ends-none");
    if (data.ends === null) {
      table("#ends", []);
      const counts = Object.entries(data.endCounts).map(([k, v]) => k + ": " + v).join(", ") || "none yet";
      none.hidden = false;
      none.textContent = "Each end's record is kept with --state-dir. Ends since start by reason: " + counts;
    } else {
      table("#ends", data.ends.map((e) => [e.sandboxID, e.templateID, new Date(e.endedAt * 1000).toLocaleString(), e.reason, (e.detail || "").split("\n").slice(-1)[0]]));
      none.hidden = data.ends.length > 0;
      none.textContent = "No sandbox has ended yet.";
    }
  }

  document.addEventListener("DOMContentLoaded", () => { load(); setInterval(load, 5000); });
})();
