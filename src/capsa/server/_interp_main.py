# Runs in the guest (sent to python3 -u -c BOOTSTRAP); see _guest_interpreter.py. Standard library only.
from __future__ import annotations

import ast
import base64
import datetime
import io
import json
import os
import sys
import traceback
import warnings
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")  # figures become PNG results at the end of a cell
warnings.filterwarnings("ignore", message=r"(?s).*(non-interactive|non-GUI backend)")

_proto = os.fdopen(os.dup(1), "w", encoding="utf-8")  # flushed per output chunk and per cell end
os.dup2(2, 1)
_contexts: dict[str, dict[str, Any]] = {}
_count = 0


def _emit(event: dict[str, Any], flush: bool = True) -> None:
    _proto.write(json.dumps(event) + "\n")
    if flush:
        _proto.flush()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()  # noqa: UP017 (older guests)


class _Stream:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def write(self, text: str) -> int:
        if text:
            _emit({"type": self.kind, "text": str(text), "timestamp": _now()})
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _context(cid: str, cwd: str | None = None) -> dict[str, Any]:
    if cid not in _contexts:
        _contexts[cid] = {"globals": {"__name__": "__main__"}, "cwd": cwd or "/home/user"}
    return _contexts[cid]


def _run(ctx: dict[str, Any], code: str, env: dict[str, str]) -> None:
    global _count
    _count += 1
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Stream("stdout"), _Stream("stderr")
    try:
        os.makedirs(ctx["cwd"], exist_ok=True)
        os.chdir(ctx["cwd"])
        tree = ast.parse(code, "<cell>", "exec")
        last: ast.Expression | None = None
        tail = tree.body[-1] if tree.body else None
        if isinstance(tail, ast.Expr):
            tree.body.pop()
            last = ast.Expression(tail.value)
        exec(compile(tree, "<cell>", "exec"), ctx["globals"])
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), ctx["globals"])
            if value is not None:
                _emit({"type": "result", **_formats(value), "is_main_result": True}, flush=False)
        _figures()
    except BaseException as exc:  # report everything, including SystemExit and KeyboardInterrupt
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = {"type": "error", "name": type(exc).__name__, "value": str(exc), "traceback": text}
        _emit(error, flush=False)
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _emit({"type": "number_of_executions", "execution_count": _count}, flush=False)


_REPRS = {
    "html": "_repr_html_",
    "markdown": "_repr_markdown_",
    "svg": "_repr_svg_",
    "png": "_repr_png_",
    "jpeg": "_repr_jpeg_",
    "latex": "_repr_latex_",
    "json": "_repr_json_",
    "javascript": "_repr_javascript_",
}


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _formats(value: Any) -> dict[str, Any]:
    """A value's representations, as Jupyter's display protocol gives them (``_repr_html_``, ...);
    a matplotlib figure is rendered to PNG (and closed, so it is not shown twice)."""
    formats: dict[str, Any] = {"text": repr(value)}
    if type(value).__module__.startswith("matplotlib.") and hasattr(value, "savefig"):
        formats["png"] = _png(value)
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(value)
        return formats
    for name, method in _REPRS.items():
        render = getattr(value, method, None)
        if not callable(render):
            continue
        try:
            data = render()
        except Exception:
            continue
        if isinstance(data, tuple):  # (data, metadata)
            data = data[0]
        if isinstance(data, bytes):
            data = base64.b64encode(data).decode()
        if data is not None:
            formats[name] = data
    return formats


def _figures() -> None:
    """Every matplotlib figure still open after a cell, as a PNG result; then close them (as
    Jupyter's inline backend does)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        result = {"type": "result", "text": repr(figure), "png": _png(figure)}
        _emit({**result, "is_main_result": False}, flush=False)
    pyplot.close("all")


def main() -> None:
    _emit({"type": "ready"})
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "exec":
            _run(_context(request.get("ctx") or "default"), request["code"], request.get("env") or {})
        elif op == "create":
            _context(request["ctx"], request.get("cwd"))
        elif op == "env":
            os.environ.update(request["env"])
        elif op == "remove":
            _contexts.pop(request["ctx"], None)
        elif op == "restart":
            cwd = _contexts.get(request["ctx"], {}).get("cwd")
            _contexts.pop(request["ctx"], None)
            _context(request["ctx"], cwd)
        _emit({"type": "end"})


main()
