"""Child processes of the main process: iothreads and guests.

Every iothread and every guest of a run is a process forked from the
main process (the "VMM") after the shared resources exist, so that it
inherits guest memory (a memfd mapping), the eventfds and any shared
control blocks without passing anything by name.  This module starts,
watches and stops such children; what a child runs is the caller's.

The kernel contract it relies on:

- ``fork`` copies the calling thread only.  A child must not touch
  locks other threads of the parent may have held, so the child runs
  the given target and leaves with ``os._exit``: it never returns into
  the parent's code (a test runner, the QMP thread's objects) and never
  runs the parent's ``atexit`` or ``finally`` blocks.
- ``pidfd_open`` (Linux 5.3) gives a descriptor that becomes readable
  when the process exits, race-free against pid reuse while the child is
  unreaped.  The parent waits on pidfds with ``select``, so death is
  noticed without SIGCHLD handlers, and ``pidfd_send_signal`` signals
  exactly that process.
- ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL to the child when
  its parent *thread* exits (not the parent process).  Children are
  therefore forked by the thread that created the supervisor (the main
  thread, as a rule) or, when another thread asks (QMP's worker runs
  ``object-add``), by a forking thread of the supervisor's own that
  lives until :meth:`Supervisor.close`.  A child that
  was orphaned between ``fork`` and the ``prctl`` sees a different
  ``getppid()`` and exits at once.
- Ctrl-C sends SIGINT to the whole foreground process group.  Children
  ignore SIGINT: the parent takes the KeyboardInterrupt, stops them in
  order, and runs its clean-up.  While :meth:`Supervisor.close` runs,
  SIGINT is blocked so that a second Ctrl-C cannot cut the clean-up
  short; it is delivered afterwards.

The ready handshake: each child gets the write end of a pipe.  It calls
``ready(**info)`` once its set-up is done (an iothread sends its thread
id); the parent waits for that line, for the child's death, or for a
timeout.  The pipe stays open afterwards: a child that fails writes its
last words (the exception) there, and the parent puts them in the
:class:`~qiothread.errors.ChildProcessError_` it raises.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import enum
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

from qiothread.errors import ChildProcessError_, InternalError

__all__ = [
    "Child",
    "ChildState",
    "ReadyChannel",
    "Supervisor",
    "set_comm",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int

#: Exit status of a child whose target raised.
EXIT_FAILURE = 1


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_comm(name: str) -> None:
    """Set the calling thread's name (``/proc/self/task/TID/comm``).

    The kernel keeps 15 bytes; longer names are cut there.  (QEMU's
    ``pthread_setname_np`` would fail instead and leave the thread
    unnamed; a cut name is more use to someone reading ``top``.)
    """
    raw = name.encode()[:15]
    buf = ctypes.create_string_buffer(raw, 16)
    _prctl(_PR_SET_NAME, ctypes.addressof(buf))


class ChildState(enum.Enum):
    """Where a child is in its life, as the parent sees it."""

    #: Forked; the ready line has not arrived yet.
    STARTING = "starting"
    #: Ready and expected to keep running.
    RUNNING = "running"
    #: A stop was requested; an exit now is expected.
    STOPPING = "stopping"
    #: Reaped: ``returncode`` is set.
    EXITED = "exited"


class ReadyChannel:
    """The child's end of the handshake pipe (child side only)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._sent = False

    def ready(self, **info: Any) -> None:
        """Tell the parent that set-up is done; ``info`` is JSON-able."""
        if self._sent:
            raise InternalError("ready() called twice")
        self._sent = True
        self._write({"ready": info})

    def fail(self, message: str) -> None:
        """Leave ``message`` for the parent's error report."""
        with contextlib.suppress(OSError):
            self._write({"error": message})

    def _write(self, obj: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(obj) + "\n").encode())


class Child:
    """One supervised child process (parent side).

    Parent thread only, except :meth:`fileno`, which any loop may watch.
    """

    def __init__(self, name: str, pid: int, pidfd: int, pipe_r: int,
                 stop_request: Callable[[Child], None] | None,
                 may_exit: bool = False) -> None:
        #: Human name used in messages, e.g. ``iothread 'io0'``.
        self.name = name
        self.pid = pid
        self.pidfd = pidfd
        self._pipe_r = pipe_r
        self._buf = b""
        self._eof = False
        self._stop_request = stop_request
        #: An exit with status 0 is the child finishing its job (a
        #: guest's workload), not a failure.
        self.may_exit = may_exit
        self.state = ChildState.STARTING
        #: What the child passed to ``ready()``.
        self.info: dict[str, Any] = {}
        #: The child's reported error, if it sent one.
        self.last_words: str | None = None
        #: As ``subprocess``: exit status, or minus the killing signal.
        self.returncode: int | None = None
        # The ready line, once read (kept even if read by _reap).
        self._ready: dict[str, Any] | None = None

    def fileno(self) -> int:
        """The pidfd: readable once the child has exited."""
        return self.pidfd

    @property
    def alive(self) -> bool:
        """Not yet reaped and the pidfd does not report an exit."""
        if self.returncode is not None:
            return False
        r, _, _ = select.select([self.pidfd], [], [], 0)
        return not r

    def _read_pipe(self) -> list[dict[str, Any]]:
        """Read what the child wrote so far; return the complete lines."""
        while not self._eof:
            r, _, _ = select.select([self._pipe_r], [], [], 0)
            if not r:
                break
            chunk = os.read(self._pipe_r, 65536)
            if not chunk:
                self._eof = True
                break
            self._buf += chunk
        lines, _, self._buf = self._buf.rpartition(b"\n")
        msgs = []
        for line in lines.split(b"\n") if lines else []:
            try:
                msgs.append(json.loads(line))
            except ValueError:
                log.warning("%s: bad handshake line %r", self.name, line)
        for m in msgs:
            if "error" in m:
                self.last_words = str(m["error"])
            if "ready" in m and self._ready is None:
                self._ready = dict(m["ready"])
        return msgs

    def poll(self) -> int | None:
        """Reap the child if it has exited; its ``returncode`` or None.

        Never blocks.  A child reaped here counts as exited, whatever
        its state was.
        """
        if self.returncode is None and not self.alive:
            self._reap()
        return self.returncode

    def _reap(self) -> int:
        """Reap the exited child (blocks only if it has not exited)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            self._read_pipe()
            self.state = ChildState.EXITED
            os.close(self.pidfd)
            os.close(self._pipe_r)
        return self.returncode

    def _wait(self, timeout: float | None) -> bool:
        """Wait until the child exits; True if it did (then reaped)."""
        if self.returncode is not None:
            return True
        r, _, _ = select.select([self.pidfd], [], [], timeout)
        if r:
            self._reap()
            return True
        return False

    def send_signal(self, sig: int) -> None:
        """Signal this very process (never a reused pid)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def describe_exit(self) -> str:
        """``exited with status 1`` / ``was killed by signal 9 (SIGKILL)``."""
        rc = self.returncode
        if rc is None:
            return "is still running"
        if rc < 0:
            try:
                signame = signal.Signals(-rc).name
            except ValueError:
                signame = "unknown"
            text = f"was killed by signal {-rc} ({signame})"
        else:
            text = f"exited with status {rc}"
        return text

    def error(self, when: str = "") -> ChildProcessError_:
        """The exception that reports this child's unexpected exit.

        ``when`` is appended to the exit (`` before it was ready``); the
        child's last words, if any, close the message.
        """
        text = f"{self.name} (pid {self.pid}) {self.describe_exit()}{when}"
        if self.last_words:
            text += f": {self.last_words}"
        return ChildProcessError_(text)

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.pid} {self.state.value}>"


def _child_main(target: Callable[[ReadyChannel], None], pipe_w: int,
                parent_pid: int, comm: str | None,
                close_fds: list[int]) -> None:
    """Run in the child after fork; never returns."""
    code = EXIT_FAILURE
    channel = ReadyChannel(pipe_w)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        # The parent forked with SIGINT blocked; the mask is inherited.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(EXIT_FAILURE)
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if comm is not None:
            set_comm(comm)
        target(channel)
        code = 0
    except BaseException as exc:
        channel.fail("".join(
            traceback.format_exception_only(type(exc), exc)).strip())
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Supervisor:
    """Starts, watches and stops the children of one run.

    Use it as a context manager: leaving the block by any path, a
    KeyboardInterrupt included, stops every child (politely, then with
    SIGKILL) and then runs the clean-up callbacks, newest first.
    Parent's main thread (or the one thread that owns the run) only.
    """

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._cleanups = contextlib.ExitStack()
        self._parent_only_fds: set[int] = set()
        self._closed = False
        self._old_handlers: dict[int, Any] = {}
        # Children are forked from this thread, or else from _forker.
        self._owner = threading.current_thread()
        self._forker: concurrent.futures.ThreadPoolExecutor | None = None
        self._fork_lock = threading.Lock()

    # -- clean-up registry --------------------------------------------

    def callback(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` at :meth:`close`, after the children stop."""
        self._cleanups.callback(fn, *args)

    def parent_only_fd(self, fd: int) -> None:
        """Close ``fd`` in every child started from now on."""
        self._parent_only_fds.add(fd)

    # -- starting -------------------------------------------------------

    def start(self, name: str, target: Callable[[ReadyChannel], None], *,
              comm: str | None = None, ready_timeout: float = 30.0,
              stop_request: Callable[[Child], None] | None = None,
              may_exit: bool = False) -> Child:
        """Fork a child running ``target(channel)``; wait for ready.

        ``target`` must call ``channel.ready(...)`` once set up; its
        return ends the child with status 0, an exception with status 1.
        ``stop_request`` asks a running child to exit (default SIGTERM).
        ``may_exit``: an exit with status 0 is not an error for
        :meth:`check` (a guest that finished its workload).

        :raises ChildProcessError_: the child died or stayed silent for
            ``ready_timeout`` seconds before it was ready (it is reaped).
        """
        if self._closed:
            raise InternalError("Supervisor is closed")
        args = (name, target, comm, stop_request, may_exit)
        if threading.current_thread() is self._owner:
            child = self._fork(*args)
        else:
            # PR_SET_PDEATHSIG follows the forking thread: fork from a
            # thread of ours that lives until close(), not from a
            # caller's thread that may end first (QMP's worker).
            if self._forker is None:
                self._forker = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="supervisor-fork")
            child = self._forker.submit(self._fork, *args).result()
        self._wait_ready(child, ready_timeout)
        return child

    def _fork(self, name: str, target: Callable[[ReadyChannel], None],
              comm: str | None,
              stop_request: Callable[[Child], None] | None,
              may_exit: bool) -> Child:
        """Fork and register the child (one fork at a time)."""
        with self._fork_lock:
            pipe_r, pipe_w = os.pipe()
            siblings = [fd for c in self.children if c.returncode is None
                        for fd in (c.pidfd, c._pipe_r)]
            close_fds = sorted({pipe_r, *siblings, *self._parent_only_fds})
            parent_pid = os.getpid()
            sys.stdout.flush()
            sys.stderr.flush()
            # A Ctrl-C between fork and the bookkeeping below would leave
            # a child nobody stops: hold SIGINT back until it is known.
            with _sigint_blocked():
                pid = os.fork()
                if pid == 0:  # pragma: no cover - runs in the child only
                    _child_main(target, pipe_w, parent_pid, comm,
                                close_fds)
                os.close(pipe_w)
                pidfd = os.pidfd_open(pid)
                child = Child(name, pid, pidfd, pipe_r, stop_request,
                              may_exit)
                self.children.append(child)
        return child

    def _wait_ready(self, child: Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # Look for death before reading: a child that sent its
            # ready line and exited at once has then left all of it in
            # the pipe, and the read below finds it.
            gone = child._eof or not child.alive
            child._read_pipe()
            if child._ready is not None:
                child.info = child._ready
                child.state = ChildState.RUNNING
                return
            if gone:
                # Gone (or going) without a ready line: report it.
                if not child._wait(1.0):
                    child.send_signal(signal.SIGKILL)
                    child._wait(None)
                raise child.error(" before it was ready")
            left = deadline - time.monotonic()
            if left <= 0:
                child.send_signal(signal.SIGKILL)
                child._wait(None)
                raise ChildProcessError_(
                    f"{child.name} (pid {child.pid}) was not ready "
                    f"within {timeout:g} s")
            select.select([child._pipe_r, child.pidfd], [], [], left)

    # -- watching -------------------------------------------------------

    def check(self) -> None:
        """Raise if a child died while it was expected to run.

        Reaps every child that exited.  A ``may_exit`` child that exited
        with status 0 is fine.

        :raises ChildProcessError_: naming the first failed child.
        """
        for child in self.children:
            if child.state is not ChildState.RUNNING or child.alive:
                continue
            if child._reap() != 0 or not child.may_exit:
                raise child.error()

    def wait_for_death(self, timeout: float | None) -> Child | None:
        """Block until a running child exits or ``timeout`` passes.

        Returns the reaped child, or None on timeout.
        """
        watched = [c for c in self.children
                   if c.state is ChildState.RUNNING]
        if not watched:
            if timeout:
                time.sleep(timeout)
            return None
        r, _, _ = select.select(watched, [], [], timeout)
        if not r:
            return None
        dead: Child = r[0]
        dead._reap()
        return dead

    # -- stopping -------------------------------------------------------

    def stop(self, child: Child, timeout: float = 10.0) -> int:
        """Ask ``child`` to exit, SIGKILL it after ``timeout``; reap it.

        Returns its ``returncode``.  Safe to call on an exited child.
        """
        if child.returncode is not None:
            return child.returncode
        if child.state is not ChildState.STARTING:
            child.state = ChildState.STOPPING
            try:
                if child._stop_request is not None:
                    child._stop_request(child)
                else:
                    child.send_signal(signal.SIGTERM)
            except Exception:
                log.exception("%s: stop request failed", child.name)
            if child._wait(timeout):
                return child._reap()
            log.warning("%s (pid %d) did not stop within %g s; killing it",
                        child.name, child.pid, timeout)
        child.send_signal(signal.SIGKILL)
        child._wait(None)
        return child._reap()

    def close(self, timeout: float = 10.0) -> None:
        """Stop every child (newest first), then run the clean-ups.

        Runs once; SIGINT is held back meanwhile (main thread only).
        """
        if self._closed:
            return
        self._closed = True
        with _sigint_blocked():
            try:
                for child in reversed(self.children):
                    try:
                        self.stop(child, timeout)
                    except Exception:
                        log.exception("stopping %s failed", child.name)
            finally:
                if self._forker is not None:
                    self._forker.shutdown()
                self._restore_signals()
                self._cleanups.close()

    # -- signals --------------------------------------------------------

    def handle_signals(self) -> None:
        """Turn SIGTERM and SIGHUP into ``SystemExit(128 + signo)``.

        So that ``kill`` of the main process unwinds through the same
        clean-up as Ctrl-C.  Main thread only; undone by :meth:`close`.
        """
        for signo in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[signo] = signal.signal(signo, _raise_exit)

    def _restore_signals(self) -> None:
        for signo, handler in self._old_handlers.items():
            signal.signal(signo, handler)
        self._old_handlers.clear()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _raise_exit(signo: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signo)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
