// The sandbox page's file browser on <section id="files" data-sandbox="ID">: a breadcrumb, the
// directory's entries (directories open, files download), and an upload form. Uploads carry the
// CSRF token of <meta name="csrf-token"> as X-CSRF-Token. Built with DOM calls only (a file name
// from the sandbox is text, never HTML).
(function () {
  "use strict";

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    node.append(...children);
    return node;
  }

  function size(n) {
    if (n < 1024) return `${n} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = n, unit = -1;
    do { value /= 1024; unit += 1; } while (value >= 1024 && unit < units.length - 1);
    return `${value.toFixed(1)} ${units[unit]}`;
  }

  function join(dir, name) {
    return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
  }

  function mount(section) {
    const id = section.dataset.sandbox;
    if (!id) return;
    const api = `/ui/api/sandboxes/${encodeURIComponent(id)}/files`;
    const meta = document.querySelector('meta[name="csrf-token"]');
    const csrf = meta ? meta.content : "";

    const crumbs = el("nav", { className: "files-crumbs", ariaLabel: "path" });
    const message = el("p", { className: "files-message" });
    message.setAttribute("role", "status");
    const body = el("tbody");
    const table = el("table", { className: "files-table" },
      el("thead", {}, el("tr", {}, el("th", { textContent: "name" }), el("th", { textContent: "size" }),
        el("th", { textContent: "modified" }))),
      body);
    const input = el("input", { type: "file", multiple: true, name: "file", className: "files-input" });
    const button = el("button", { type: "submit", textContent: "upload" });
    const form = el("form", { className: "files-upload" }, input, button);
    section.append(crumbs, table, form, message);

    let current = null;

    function showCrumbs(path) {
      crumbs.replaceChildren();
      const parts = path.split("/").filter(Boolean);
      const root = el("a", { href: "#", textContent: "/" });
      root.addEventListener("click", (e) => { e.preventDefault(); open("/"); });
      crumbs.append(root);
      let at = "";
      parts.forEach((part, i) => {
        at += `/${part}`;
        const target = at;
        const link = el("a", { href: "#", textContent: part });
        link.addEventListener("click", (e) => { e.preventDefault(); open(target); });
        crumbs.append(link);
        if (i < parts.length - 1) crumbs.append(el("span", { textContent: "/" }));
      });
    }

    async function open(path) {
      message.textContent = "";
      const query = path ? `?path=${encodeURIComponent(path)}` : "";
      let reply;
      try {
        reply = await fetch(api + query, { credentials: "same-origin" });
      } catch (err) {
        message.textContent = `cannot list: ${err}`;
        return;
      }
      const data = await reply.json().catch(() => ({}));
      if (!reply.ok) {
        message.textContent = `cannot list ${path || "home"}: ${data.message || reply.status}`;
        return;
      }
      current = data.path;
      section.dataset.path = current;
      showCrumbs(current);
      body.replaceChildren();
      if (data.parent) {
        const up = el("a", { href: "#", textContent: ".." });
        up.addEventListener("click", (e) => { e.preventDefault(); open(data.parent); });
        body.append(el("tr", {}, el("td", {}, up), el("td"), el("td")));
      }
      for (const entry of data.entries) {
        const full = join(current, entry.name);
        let name;
        if (entry.type === "dir") {
          name = el("a", { href: "#", textContent: `${entry.name}/`, className: "files-dir" });
          name.addEventListener("click", (e) => { e.preventDefault(); open(full); });
        } else if (entry.type === "file") {
          name = el("a", { href: `${api}/download?path=${encodeURIComponent(full)}`, textContent: entry.name,
            className: "files-file" });
          name.setAttribute("download", entry.name);
        } else {
          name = el("span", { textContent: entry.name + (entry.type === "symlink" ? " →" : "") });
        }
        const row = el("tr", {}, el("td", {}, name),
          el("td", { textContent: entry.type === "dir" ? "" : size(entry.size) }),
          el("td", { textContent: entry.mtime.replace("T", " ").replace(/\.\d+Z$/, "Z") }));
        row.dataset.name = entry.name;
        body.append(row);
      }
      if (data.truncated) message.textContent = "(only the first entries are shown)";
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!input.files.length || current === null) return;
      const data = new FormData();
      for (const file of input.files) data.append("file", file, file.name);
      message.textContent = "uploading…";
      button.disabled = true;
      try {
        const reply = await fetch(`${api}?path=${encodeURIComponent(current)}`, {
          method: "POST", body: data, credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
        });
        const answer = await reply.json().catch(() => ({}));
        if (!reply.ok) {
          message.textContent = `upload failed: ${answer.message || reply.status}`;
          return;
        }
        input.value = "";
        await open(current);
        message.textContent = `uploaded ${answer.written.length} file(s)`;
      } catch (err) {
        message.textContent = `upload failed: ${err}`;
      } finally {
        button.disabled = false;
      }
    });

    open(section.dataset.path || "");
  }

  function start() {
    const section = document.getElementById("files");
    if (section) mount(section);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
