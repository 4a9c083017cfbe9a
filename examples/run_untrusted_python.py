"""Run a snippet of untrusted Python (say, written by an LLM) in a throwaway sandbox.

    .venv/bin/python examples/run_untrusted_python.py 'print(sum(range(10)))'

The code runs as root inside a VM with no network; nothing it does survives the sandbox. A time
limit stops runaway code; its output and exit code come back as data.
"""

from __future__ import annotations

import asyncio
import sys

import capsa


async def run_snippet(code: str, timeout: float = 30) -> capsa.ExecResult:
    async with await capsa.sandbox().memory_mb(512).no_network().build() as vm:
        await vm.agent.write_file("/tmp/snippet.py", code)
        return await vm.agent.exec("python3").arg("/tmp/snippet.py").timeout(timeout).run()


def main() -> int:
    code = sys.argv[1] if len(sys.argv) > 1 else "import platform; print(platform.platform())"
    try:
        result = asyncio.run(run_snippet(code))
    except capsa.ExecTimeoutError as exc:
        sys.stdout.write(exc.stdout.decode(errors="replace"))
        sys.stderr.write("the snippet ran too long and was stopped\n")
        return 124
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
