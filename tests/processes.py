"""Running the Procfile's commands as real processes, for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

# Variables the service (or gunicorn, Flask, boto3) reads: the tests set each one they need, and
# nothing from the developer's own shell may leak into the processes under test.
SERVICE_ENV_PREFIXES = ("AWS_", "PLIVO_", "FLASK_", "ARCHIVE_", "GUNICORN")
SERVICE_ENV_NAMES = {
    "DATABASE_URL",
    "PUBLIC_URL",
    "RECORDING_HOSTS",
    "RETENTION_DAYS",
    "OBJECT_LOCK_MODE",
    "MAX_CALLBACK_BYTES",
    "PRESIGN_SECONDS",
    "CONSOLE_IDLE_MINUTES",
    "AUTO_RECORD",
    "AUTO_RECORD_INTERVAL_SECONDS",
    "RECORDING_NOTICE_TEXT",
    "RECORDING_NOTICE_URL",
    "RECORDING_NOTICE_VOICE",
    "RECORDING_NOTICE_LANGUAGE",
    "DELETE_FROM_PLIVO_AFTER_DAYS",
    "PORT",
    "WEB_CONCURRENCY",
    "PYTHONPATH",
    "XDG_RUNTIME_DIR",
    "TRANSCRIPTION",
    "MEMBER_POLL_SECONDS",
}


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds, as /proc/net/tcp names them (Linux); none
    when the process is gone or not ours."""
    inodes = set()
    with suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with suppress(OSError):  # closed meanwhile
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:[") : -1])
    return inodes


def read_procfile(path: Path) -> dict[str, str]:
    """The process types of a Procfile and their commands."""
    commands: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        if not sep:
            raise ValueError(f"{path}: not a `type: command` line: {line!r}")
        commands[name.strip()] = command.strip()
    return commands


def process_env(bin_dir: Path, home: Path, settings: Mapping[str, str]) -> dict[str, str]:
    """The environment the platform would give the processes: `settings`, `bin_dir` on PATH.

    HOME is a fresh folder, as on a dyno: no ~/.aws of the developer's, and gunicorn's control
    socket ($HOME/.gunicorn/gunicorn.ctl) is not shared with any other gunicorn running here.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in SERVICE_ENV_NAMES and not key.startswith(SERVICE_ENV_PREFIXES)
    }
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)])
    # Block-buffered stdout would lose the last log lines of a process that had to be killed.
    env["PYTHONUNBUFFERED"] = "1"
    env["HOME"] = str(home)
    env.update(settings)
    return env


class Process:
    """A long-running command in its own process group, its output going to a file."""

    def __init__(self, name: str, command: str, env: Mapping[str, str], cwd: Path, logs: Path):
        self.name = name
        self.command = command
        self.log_path = logs / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                ["bash", "-c", command],
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group, so the signal reaches its children
            )

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace_seconds: float = 15.0) -> int:
        """SIGTERM the process group, wait, SIGKILL the group if it will not go; the exit code."""
        if self.running:
            self._signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        return self.popen.wait(timeout=grace_seconds)

    def _signal(self, signum: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)


def run_all(
    commands: list[list[str]], env: Mapping[str, str], cwd: Path, timeout: float = 60.0
) -> list[str]:
    """Run commands side by side to completion; their stdouts, or AssertionError with the output
    of the first that fails."""
    running = [
        (
            command,
            subprocess.Popen(
                command,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for command in commands
    ]
    outputs = []
    for command, popen in running:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            stdout, stderr = popen.communicate()
        assert popen.returncode == 0, (
            f"{' '.join(command)} exited {popen.returncode}\n"
            f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )
        outputs.append(stdout)
    return outputs


class Deployment:
    """The web and worker processes of one deployment, and their logs."""

    def __init__(self, base_url: str, processes: list[Process]) -> None:
        self.base_url = base_url
        self.processes = processes

    def logs(self) -> str:
        return "\n".join(
            f"===== {p.name} ({p.command}) exit={p.popen.poll()} =====\n{p.output()}"
            for p in self.processes
        )

    def wait_until_healthy(self, timeout: float = 30.0) -> None:
        """Poll GET /healthz until it answers 200; fail at once if a process dies."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            dead = [p.name for p in self.processes if not p.running]
            assert not dead, f"{', '.join(dead)} exited while starting\n{self.logs()}"
            try:
                response = requests.get(self.base_url + "/healthz", timeout=10)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
            except requests.RequestException as exc:
                last = str(exc)
            time.sleep(0.1)
        raise AssertionError(f"/healthz not 200 after {timeout} s: {last}\n{self.logs()}")

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print every process's output when the block fails, so a red test can be debugged."""
        try:
            yield
        except BaseException:
            print(self.logs())
            raise

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
