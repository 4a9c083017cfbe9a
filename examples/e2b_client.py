"""An unchanged E2B script, run against ``capsa serve`` instead of E2B's cloud.

    CAPSA_API_KEY=secret capsa serve --pool base=2 --pool code-interpreter-v1=1 &
    E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3000 \\
        E2B_API_KEY=secret python examples/e2b_client.py

Nothing below mentions capsa: the two URLs and the key are all that changed.
"""

from __future__ import annotations

from e2b import CommandExitException, Sandbox
from e2b_code_interpreter import Sandbox as CodeInterpreter


def main() -> None:
    with Sandbox.create(timeout=120, metadata={"example": "e2b_client"}) as sandbox:
        result = sandbox.commands.run("uname -sr; echo $GREETING", envs={"GREETING": "hello"})
        print("commands.run:", result.stdout.strip().replace("\n", " | "))
        sandbox.files.write("/tmp/notes/hello.txt", "written through the E2B SDK\n")
        print("files.read:", sandbox.files.read("/tmp/notes/hello.txt").strip())
        print("files.list:", [entry.name for entry in sandbox.files.list("/tmp/notes")])
        try:
            sandbox.commands.run("exit 3")
        except CommandExitException as exc:
            print("a failing command raises CommandExitException, exit code", exc.exit_code)
        worker = sandbox.commands.run("sleep 30", background=True)
        print("background pids:", [p.pid for p in sandbox.commands.list()])
        worker.kill()

    with CodeInterpreter.create() as interpreter:
        interpreter.run_code("x = 41")
        execution = interpreter.run_code("print('state is kept'); x + 1")
        print("run_code:", execution.logs.stdout[0], "->", execution.text)
        error = interpreter.run_code("1 / 0").error
        print("errors come back as values:", error.name if error else None)


if __name__ == "__main__":
    main()
