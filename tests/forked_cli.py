"""Run the ``atc`` entry point many times without paying torch's import each time.

A server process imports ``cli.app`` (and with it torch) once, then forks one child per
request. Each child is a separate process that starts from the same freshly imported state,
runs ``cli.app.run()`` with its own argv, working folder and environment, writes stdout and
stderr to files and exits with the entry point's exit code, just as ``python -m cli`` would.
An uncaught exception prints its traceback and exits with 1, as the interpreter does. A
request may carry ``prelude`` code that the child runs first, to simulate a failing machine.

POSIX only (``os.fork``); tests that use it skip elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, sys, traceback
import cli.app
import compressor.models.checkpoint, compressor.data.images, compressor.distill.loop, compressor.pipeline  # noqa: F401

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            sys.argv = ["atc", *req["argv"]]
            if req.get("prelude"):
                exec(compile(req["prelude"], "<prelude>", "exec"), {"__name__": "prelude"})
            try:
                cli.app.run()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedCli:
    def __init__(self, env: dict[str, str]):
        self._dir = tempfile.TemporaryDirectory(prefix="atc-forked-cli-")
        self._env = env
        self._proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, cwd=ROOT, env=env)
        self._n = 0

    def __call__(self, *args: str, cwd: Path | None = None, prelude: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
        self._n += 1
        out, err = Path(self._dir.name) / f"{self._n}.out", Path(self._dir.name) / f"{self._n}.err"
        env = {**self._env, **{k: v for k, v in os.environ.items() if k.startswith("ATC_")}}
        req = {"argv": list(args), "cwd": str(cwd or ROOT), "env": env, "stdout": str(out), "stderr": str(err), "prelude": prelude}
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError("the forked CLI server died")
        rc = json.loads(reply)["rc"]
        return subprocess.CompletedProcess(["atc", *args], rc, out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        self._proc.wait(timeout=30)
        self._dir.cleanup()
