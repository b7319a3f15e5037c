"""How the local engine starts its processes: each a fresh interpreter, or the trainers and
the export as children forked from one process that has imported them once.

``fedstudy run`` runs the very commands the operator puts in pods: ``fedstudy aggregator``,
one ``fedstudy trainer`` per site, then ``fedstudy export``. As fresh interpreters, every
trainer imports PyTorch, pandas and scikit-learn on its own: seconds each, all on the same
few cores. With ``Launcher(forked=True)`` the engine starts a fork server as soon as the run
begins (``python -c 'from fedstudy.launch import serve; serve()' MODULE...``); it imports the
trainer's and the export's modules once, while the engine issues the certificates and starts
the aggregator. Each trainer, and the export at the end, is then a child forked from it that
runs the same entry point with the same arguments as ``python -m fedstudy ARGS`` does
(``fedstudy.cli.main``) and exits with its exit code; a child also skips the interpreter's
teardown of all those modules (seconds of garbage collection), as its exit is ``os._exit``
after the ``atexit`` handlers.

The fork server only imports before it forks: it starts no PyTorch thread pool, opens no
gRPC channel and initialises no gRPC runtime (that happens on a process's first channel).
Two native libraries start a thread when they are loaded, and both are made for fork:
OpenBLAS stops its pool before a fork (pthread_atfork) and starts it again when used, and
the jemalloc in pyarrow keeps its heap consistent across a fork with its own fork handlers.

A forked child reads /dev/null, appends its stdout and stderr to its log files unbuffered
(as with PYTHONUNBUFFERED=1), works in the engine's folder with the environment the engine
gives it, and asks Linux for SIGTERM when the fork server dies. The fork server asks the same
of the engine and ends when the engine closes its requests pipe: nothing outlives the engine.

The engine and the server speak in lines: a request is a JSON object (args, stdout, stderr,
env, cwd) and the server answers ``started PID``; when a child ends, ``exited PID CODE``
(CODE as subprocess gives it: minus the signal's number when a signal ended the child).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import json
import os
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

# The commands a fork server starts (the aggregator imports little, and it must not wait
# for the server's imports: it is always a fresh interpreter).
FORKED_COMMANDS = frozenset({"trainer", "export"})
# What the fork server imports before its first fork: the entry points of those commands, and
# torch._dynamo, which the first optimizer a process builds imports (most of a second).
PRELOAD = ("fedstudy.cli", "fedstudy_trainer.main", "fedstudy_trainer.export", "torch._dynamo")
# A child whose fork server died before it told the engine how the child ended.
EXIT_UNKNOWN = 255


def forking_supported() -> bool:
    """Children that die with their parent (prctl): Linux only."""
    return sys.platform.startswith("linux")


def die_with_parent() -> None:  # pragma: no cover - runs in a child
    """Asks Linux to send SIGTERM to this process when its parent dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class ChildProcess(ABC):
    """One started command: a fresh interpreter or a child of the fork server."""

    pid: int

    @abstractmethod
    def poll(self) -> int | None:
        """The exit code (minus the signal's number when a signal ended it); None while it
        runs."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> int | None:
        """Waits up to ``timeout`` seconds (None: for ever); the exit code, None if it still
        runs."""

    @abstractmethod
    def send_signal(self, sig: int) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Releases what the engine holds for the child, once it has ended."""

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def terminate(self) -> None:
        if self.poll() is None:
            self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.poll() is None:
            self.send_signal(signal.SIGKILL)


class PopenChild(ChildProcess):
    """``python -m fedstudy ARGS`` in a fresh interpreter."""

    def __init__(
        self, args: Sequence[str], stdout: Path, stderr: Path | None, env: Mapping[str, str]
    ) -> None:
        self._files: list[IO[bytes]] = [open(stdout, "ab")]  # noqa: SIM115 - closed in close()
        if stderr is not None:
            self._files.append(open(stderr, "ab"))  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedstudy", *args],
                stdin=subprocess.DEVNULL,
                stdout=self._files[0],
                stderr=self._files[1] if stderr is not None else subprocess.STDOUT,
                env=dict(env),
                preexec_fn=die_with_parent if forking_supported() else None,
            )
        except BaseException:
            self.close()
            raise
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(timeout=timeout)
        return None

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def close(self) -> None:
        for f in self._files:
            f.close()


class ForkServer:
    """The engine's end of a fork server: ``fork`` asks it for a child, and the server says
    when each child ends."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fedstudy.launch import serve; serve()", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._requests = self.proc.stdin
        self._answers = self.proc.stdout.fileno()
        self._buffer = b""
        self._started: deque[int] = deque()
        self._codes: dict[int, int] = {}
        self._ended = False

    def fork(
        self, args: Sequence[str], stdout: Path, stderr: Path | None, env: Mapping[str, str]
    ) -> int:
        """Starts ``fedstudy ARGS`` in a child; returns its pid. The first call waits for the
        server's imports."""
        request = {
            "args": list(args),
            "stdout": str(stdout),
            "stderr": None if stderr is None else str(stderr),
            "env": dict(env),
            "cwd": os.getcwd(),
        }
        try:
            self._requests.write(json.dumps(request).encode() + b"\n")
            self._requests.flush()
        except (BrokenPipeError, ValueError):
            raise OSError("the fork server has exited") from None
        while not self._started:
            if self._ended:
                raise OSError("the fork server exited before it started the child")
            self._read(None)
        return self._started.popleft()

    def exit_code(self, pid: int, timeout: float | None = 0.0) -> int | None:
        """The child's exit code once it has ended, waiting up to ``timeout`` seconds
        (None: for ever) for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._codes:
            if self._ended:
                return EXIT_UNKNOWN
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._read(left) and left == 0.0:
                return None
        return self._codes[pid]

    def _read(self, timeout: float | None) -> bool:
        """Reads what the server said, waiting up to ``timeout``; False if it said nothing."""
        ready, _, _ = select.select([self._answers], [], [], timeout)
        if not ready:
            return False
        data = os.read(self._answers, 65536)
        if not data:
            self._ended = True
            return True
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            word, *numbers = line.split()
            if word == b"started":
                self._started.append(int(numbers[0]))
            elif word == b"exited":
                self._codes[int(numbers[0])] = int(numbers[1])
        return True

    def close(self) -> None:
        """Ends the server, at once, importing or not (a child still running gets SIGTERM
        as the server ends)."""
        with contextlib.suppress(OSError):
            self._requests.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class ForkedChild(ChildProcess):
    """``fedstudy ARGS`` in a child of the fork server."""

    def __init__(
        self,
        server: ForkServer,
        args: Sequence[str],
        stdout: Path,
        stderr: Path | None,
        env: Mapping[str, str],
    ) -> None:
        self.server = server
        self.pid = server.fork(args, stdout, stderr, env)

    def poll(self) -> int | None:
        return self.server.exit_code(self.pid)

    def wait(self, timeout: float | None = None) -> int | None:
        return self.server.exit_code(self.pid, timeout)

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def close(self) -> None:
        pass  # the server holds nothing per child


class Launcher:
    """Starts ``fedstudy`` commands; with ``forked``, the trainers and the export come from
    a fork server, which ``warm`` starts early. ``close`` ends the server."""

    def __init__(self, forked: bool) -> None:
        self.forked = forked and forking_supported()
        self.server: ForkServer | None = None

    def warm(self) -> None:
        """Starts the fork server now; it imports ``PRELOAD`` in the background."""
        if self.forked and self.server is None:
            self.server = ForkServer()

    def start(
        self,
        args: Sequence[str],
        stdout: Path,
        stderr: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ChildProcess:
        """Runs ``fedstudy ARGS`` with its stdout appended to ``stdout`` and its stderr to
        ``stderr`` (None: to ``stdout`` as well), unbuffered, in ``env`` (default: this
        process's environment)."""
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        if self.forked and args[0] in FORKED_COMMANDS:
            self.warm()
            assert self.server is not None
            try:
                return ForkedChild(self.server, args, stdout, stderr, env)
            except OSError as e:
                print(
                    f"fedstudy: cannot fork {args[0]} from the fork server ({e}); "
                    "starting it as a fresh process",
                    file=sys.stderr,
                )
                self.forked = False
        return PopenChild(args, stdout, stderr, env)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


# --- the fork server and its children -----------------------------------------------------


def serve() -> None:  # pragma: no cover - runs in the fork server
    """The fork server's body: imports the modules named on its command line, then forks a
    child per request read from stdin until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the engine and the children
    # The requests and the answers keep fds of their own; 0 and 1 read and write /dev/null, so
    # that nothing printed here (or left in sys.stdout's buffer for a child) mixes with them.
    request_fd, answer_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    for name in sys.argv[1:]:
        # A module that fails to import fails again in the child, which reports it as a
        # fresh interpreter would.
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(request_fd, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                    _reap(answer_fd)
                    continue
                data = os.read(request_fd, 65536)
                if not data:  # the engine is done (or gone): so are we, without teardown
                    os._exit(0)
                pending += data
                *requests, pending = pending.split(b"\n")
                for request in requests:
                    server = os.getpid()
                    pid = os.fork()
                    if pid == 0:
                        try:
                            selector.close()
                            for fd in (wake_r, wake_w, request_fd, answer_fd):
                                os.close(fd)
                            _child(json.loads(request), server)
                        finally:
                            os._exit(1)
                    _answer(answer_fd, f"started {pid}")


def _answer(fd: int, line: str) -> None:  # pragma: no cover - runs in the fork server
    try:
        os.write(fd, line.encode() + b"\n")
    except BrokenPipeError:
        os._exit(0)


def _reap(answers: int) -> None:  # pragma: no cover - runs in the fork server
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _answer(answers, f"exited {pid} {os.waitstatus_to_exitcode(status)}")


def _child(request: dict[str, Any], server: int) -> None:  # pragma: no cover - in a child
    """Becomes ``python -m fedstudy ARGS`` (without starting an interpreter) and exits."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    die_with_parent()
    if os.getppid() != server:  # the server died before the line above
        os._exit(1)
    _redirect(request["stdout"], request["stderr"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    args: list[str] = request["args"]
    from fedstudy import cli

    sys.argv = [str(Path(cli.__file__).with_name("__main__.py")), *args]
    interrupted = False
    try:
        code = _exit_code(cli.main(args))
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code, interrupted = 130, True
    except BaseException:
        traceback.print_exc()
        code = 1
    # What the interpreter does at exit, but its teardown: wait for the threads, run the
    # atexit handlers, flush.
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if interrupted:  # as Python does after an uncaught KeyboardInterrupt: die of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _exit_code(value: object) -> int:  # pragma: no cover - runs in a child
    """The exit code of ``raise SystemExit(value)``, printing a message as Python does."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _redirect(stdout: str, stderr: str | None) -> None:  # pragma: no cover - runs in a child
    """stdin from /dev/null; fds 1 and 2 on the log files, and sys.stdout and sys.stderr
    unbuffered text streams on them, as ``python -u`` makes them."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(stdout, flags, 0o666)
    err = os.open(stderr, flags, 0o666) if stderr is not None else out
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {null, out, err}:
        os.close(fd)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdin = open(0, encoding=encoding, closefd=False)  # noqa: SIM115 - the process's own
    sys.stdout = _unbuffered(1, encoding, getattr(sys.stdout, "errors", None) or "strict")
    sys.stderr = _unbuffered(2, encoding, "backslashreplace")


def _unbuffered(fd: int, encoding: str, errors: str) -> Any:  # pragma: no cover - in a child
    import io

    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False),
        encoding=encoding,
        errors=errors,
        newline="\n",
        write_through=True,
    )
