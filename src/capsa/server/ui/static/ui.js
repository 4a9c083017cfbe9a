// Shared by every dashboard page: the CSRF token, a fetch that sends it, small formatters and
// the hand-drawn SVG sparkline. Exposed as window.capsaUi for the page scripts (and uiterm's).
"use strict";
(function () {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";

  // A state-changing request: same origin, the session cookie, the CSRF header.
  async function post(url, body) {
    const init = { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (response.status === 401) { location.href = "/ui/login?next=" + encodeURIComponent(location.pathname); }
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).message || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return response;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function duration(seconds) {
    if (seconds < 0) seconds = 0;
    seconds = Math.floor(seconds);
    if (seconds < 60) return seconds + "s";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m " + (seconds % 60) + "s";
    if (seconds < 86400) return Math.floor(seconds / 3600) + "h " + Math.floor((seconds % 3600) / 60) + "m";
    return Math.floor(seconds / 86400) + "d " + Math.floor((seconds % 86400) / 3600) + "h";
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  const SVG = "http://www.w3.org/2000/svg";
  // A sparkline of values (0..max) as an SVG polyline, width x height pixels.
  function sparkline(values, max, width, height, cls) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("width", width); svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("class", "spark " + (cls || ""));
    if (values.length > 1 && max > 0) {
      const step = width / (values.length - 1);
      const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 1 - (Math.min(v, max) / max) * (height - 2)).toFixed(1)}`);
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.join(" "));
      svg.append(line);
    }
    return svg;
  }

  document.addEventListener("DOMContentLoaded", () => {
    const button = document.getElementById("logout");
    if (button) button.addEventListener("click", async () => {
      try { await post("/ui/logout"); } finally { location.href = "/ui/login"; }
    });
  });

  window.capsaUi = { csrf, post, el, duration, bytes, sparkline };
})();
