// The sandbox page's terminal: an xterm.js terminal on <section id="terminal" data-sandbox="ID">,
// connected to /ui/api/sandboxes/ID/terminal on this origin (binary frames: terminal bytes; text
// frames: {"type":"resize"} from here, {"type":"exit","reason"} from the server).
// Needs vendor/xterm/xterm.js (window.Terminal) loaded first; the fit addon is loaded here if the
// page did not include vendor/xterm/addon-fit.js.
(function () {
  "use strict";
  const MAX_FRAME = 16 * 1024; // the server refuses input frames over 64 KiB: a big paste is split
  const VENDOR = "/ui/static/vendor/xterm";

  function load(src) {
    return new Promise((resolve, reject) => {
      const tag = document.createElement("script");
      tag.src = src;
      tag.onload = resolve;
      tag.onerror = () => reject(new Error(`cannot load ${src}`));
      document.head.append(tag);
    });
  }

  async function mount(section) {
    const id = section.dataset.sandbox;
    if (!id) return;
    if (!window.Terminal) await load(`${VENDOR}/xterm.js`);
    if (!window.FitAddon) await load(`${VENDOR}/addon-fit.js`);
    const screen = document.createElement("div");
    screen.className = "terminal-screen";
    screen.style.height = "24em"; // the fit addon sizes the terminal to its container
    screen.style.minHeight = "10em";
    const status = document.createElement("p");
    status.className = "terminal-status";
    status.setAttribute("role", "status");
    section.append(screen, status);

    const term = new window.Terminal({ cursorBlink: true, convertEol: false, scrollback: 5000 });
    const fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(screen);
    fit.fit();

    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/ui/api/sandboxes/${encodeURIComponent(id)}/terminal` +
      `?rows=${term.rows}&cols=${term.cols}`;
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    let ended = false;
    const encoder = new TextEncoder();

    function end(reason) {
      if (ended) return;
      ended = true;
      status.textContent = `session ended: ${reason}`;
      section.dataset.state = "ended";
      term.options.disableStdin = true;
    }

    socket.addEventListener("open", () => {
      status.textContent = "connected";
      section.dataset.state = "open";
      term.focus();
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") {
        let message = null;
        try { message = JSON.parse(event.data); } catch (_) { /* not for us */ }
        if (message && message.type === "exit") end(String(message.reason || "closed"));
        return;
      }
      term.write(new Uint8Array(event.data));
    });
    socket.addEventListener("close", (event) => {
      end(event.reason || (event.code === 1006 ? "connection lost or refused" : `closed (${event.code})`));
    });

    term.onData((data) => {
      if (socket.readyState !== WebSocket.OPEN) return;
      const bytes = encoder.encode(data);
      for (let at = 0; at < bytes.length; at += MAX_FRAME) socket.send(bytes.subarray(at, at + MAX_FRAME));
    });
    term.onBinary((data) => { // mouse reports in some modes: one byte per char
      if (socket.readyState !== WebSocket.OPEN) return;
      const bytes = Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff);
      socket.send(bytes);
    });
    term.onResize(({ rows, cols }) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", rows, cols }));
    });
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => fit.fit(), 100);
    });
    window.addEventListener("beforeunload", () => socket.close());
    section.capsaTerminal = { term, socket }; // for tests and the page
  }

  function start() {
    const section = document.getElementById("terminal");
    if (section) {
      mount(section).catch((err) => {
        section.append(Object.assign(document.createElement("p"), { className: "terminal-status",
          textContent: `session ended: ${err.message}` }));
      });
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
