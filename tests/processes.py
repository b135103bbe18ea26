"""Real `dinokit` processes for the fault tests, started in a fraction of a second.

Importing torch and dinokit takes seconds per process on a busy machine, and these tests start dozens. A
server process imports everything once, then forks a fresh child per command: each child is a real process
with its own PID, running `dinokit.cli.main(argv)` exactly as `python -m dinokit` would, so a SIGKILL is a
real SIGKILL and a lock holder's PID is real. (The server forks before any torch op has started a thread.)

Usage: `with CliServer() as cli: run = cli.start(argv, log_path, env={...}); run.wait_for_pause(); run.kill()`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dinokit.atomic import PAUSE_ENV, PAUSE_MESSAGE

REPO = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, sys, traceback
import faiss, pyarrow.parquet, torch  # noqa: F401  (imported once, shared by every child)
import dinokit.cli, dinokit.apps.embed, dinokit.apps.index, dinokit.ssl.meta_arch, dinokit.eval.evaluate  # noqa
dinokit.cli.build_parser()
torch.set_num_threads(1)
reply = sys.stdout
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(request["env"])
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                code = dinokit.cli.main(request["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply.write(json.dumps(pid) + "\n")
    else:
        _, status = os.waitpid(request["pid"], 0)
        reply.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    reply.flush()
"""


class Run:
    def __init__(self, server: CliServer, pid: int, log: Path):
        self.server, self.pid, self.log = server, pid, Path(log)
        self.returncode: int | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.server.request({"op": "wait", "pid": self.pid})
        return self.returncode

    def wait_for(self, text: str, timeout: float = 120.0, file: Path | None = None) -> None:
        """Until `text` appears in the output (or in `file`); fails if the process ends first or after `timeout` s."""
        def found():
            if file is None:
                return text in self.output()
            return Path(file).is_file() and text in Path(file).read_text(errors="replace")

        deadline = time.monotonic() + timeout
        while not found():
            if not self._alive() and not found():
                raise AssertionError(f"process ended before {text!r}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout} s; output:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def _alive(self) -> bool:
        try:  # the server, not this process, is the parent: read the state from /proc
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    def wait_for_pause(self, timeout: float = 120.0) -> None:
        self.wait_for(PAUSE_MESSAGE, timeout)

    def kill(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        code = self.wait()
        assert code == -signal.SIGKILL, f"exit code {code}, expected death by SIGKILL:\n{self.output()[-3000:]}"
        return code


class CliServer:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
        env.pop(PAUSE_ENV, None)
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True, cwd=REPO)

    def request(self, message: dict):
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI server died (exit code {self.process.wait()})")
        return json.loads(line)

    def start(self, argv: list[str], log: Path, pause_at: str | None = None, env: dict | None = None) -> Run:
        """`dinokit ARGV` in a new process; pause_at: DINOKIT_TEST_PAUSE_AT ("<glob>[#n]", see dinokit.atomic)."""
        env = dict(env or {})
        env[PAUSE_ENV] = pause_at or ""
        return Run(self, self.request({"op": "run", "argv": [str(a) for a in argv], "log": str(log), "env": env}),
                   log)

    def run(self, argv: list[str], log: Path, **kwargs) -> Run:
        """Start and wait for the end."""
        run = self.start(argv, log, **kwargs)
        run.wait()
        return run

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
