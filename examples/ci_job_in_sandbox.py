"""Run a project's test suite in a throwaway sandbox: the source is shared read-only, the job works on
a copy inside the guest, and only the report comes back through a read-write share.

    .venv/bin/python examples/ci_job_in_sandbox.py PROJECT_DIR REPORT_DIR

The job cannot modify the project on the host (the share is read-only, enforced on the host), and
whatever it does inside the guest disappears with the sandbox.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import capsa
from capsa import AccessMode

JOB = """
set -e
cp -r /src /tmp/work
cd /tmp/work
python3 -m unittest discover -v > /report/unittest.log 2>&1 && echo passed > /report/status \\
  || { echo failed > /report/status; exit 1; }
"""


async def run_job(project: Path, reports: Path) -> int:
    builder = (
        capsa.sandbox()
        .share(project, "/src", AccessMode.READ_ONLY)
        .share(reports, "/report", AccessMode.READ_WRITE)
    )
    async with await builder.build() as vm:
        result = await vm.agent.exec("sh").args(["-c", JOB]).timeout(300).run()
        return result.exit_code


def main() -> int:
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        return 2
    project, reports = Path(sys.argv[1]), Path(sys.argv[2])
    reports.mkdir(parents=True, exist_ok=True)
    code = asyncio.run(run_job(project, reports))
    sys.stdout.write((reports / "status").read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
