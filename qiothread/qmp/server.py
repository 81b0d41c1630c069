"""The QMP server: a UNIX socket served by an asyncio loop in a thread.

Threads and what they touch:

- The **monitor thread** runs an asyncio loop: it accepts clients,
  reads and lexes their input, writes answers and events.  It never
  calls the backend.
- The **worker thread** (a one-thread executor) runs every command, so
  commands of all clients are serialised as QEMU serialises in-band
  commands, and a slow command does not stop event delivery.
- Any thread may emit events through the backend's listener; the
  listener hands them to the loop with ``call_soon_threadsafe``.

Each client is read one command at a time: the next input is not
looked at until the previous answer is written (QEMU without ``oob``).
A client is dropped, and only that client, when it closes its end, when
a value exceeds the size limit, or when it stops reading and more than
``MAX_OUTPUT_BUFFER`` bytes of answers and events pile up for it.

The socket is bound under a temporary name, made mode 0600, listened
on, and only then renamed to its path: the path never exists with the
umask's permissions, and never exists without a listener (a client
that polls for the file and connects at once is not refused).  A stale
socket left at the path by a crashed run is replaced, as QEMU does; any
other file there is an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import secrets
import socket
import stat
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from qiothread.errors import ConfigError, InternalError
from qiothread.qmp import protocol
from qiothread.qmp.backend import MonitorEvent, QMPBackend
from qiothread.qmp.commands import Dispatcher, Session
from qiothread.qmp.protocol import JSONStreamer, ParseError

__all__ = ["MAX_OUTPUT_BUFFER", "QMPServer"]

_log = logging.getLogger(__name__)

#: Unread output one client may accumulate before it is dropped.
MAX_OUTPUT_BUFFER = 4 << 20
_READ_SIZE = 64 * 1024
_ids = itertools.count(1)


class _Client:
    """One connection; its fields belong to the monitor thread."""

    def __init__(self, writer: asyncio.StreamWriter, pretty: bool) -> None:
        self.id = next(_ids)
        self.writer = writer
        self.pretty = pretty
        self.session = Session()
        self.log = _log.getChild(f"client{self.id}")

    def send(self, msg: dict[str, Any]) -> bool:
        """Queue ``msg``; False (and the client closed) if it is gone
        or has stopped reading."""
        if self.writer.is_closing():
            return False
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_OUTPUT_BUFFER:
            self.log.warning("client does not read its output; dropped")
            self.writer.close()
            return False
        self.log.debug("<- %s", msg)
        self.writer.write(protocol.encode(msg, self.pretty))
        return True


class QMPServer:
    """Serve QMP for ``backend`` on the UNIX socket ``path``.

    ``start()`` returns once the socket listens; ``close()`` stops
    everything and removes the socket file.  Use from the main thread.
    ``pretty`` indents the output (``-qmp-pretty``); ``max_message``
    bounds one input value.
    """

    def __init__(self, backend: QMPBackend, path: str | os.PathLike[str],
                 *, pretty: bool = False,
                 max_message: int = protocol.MAX_TOKEN_SIZE) -> None:
        self.backend = backend
        self.pretty = pretty
        #: The socket's file name.
        self.path = Path(path)
        self._max_message = max_message
        self._dispatcher = Dispatcher(backend)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop: asyncio.Event | None = None
        self._clients: set[_Client] = set()       # monitor thread only
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        #: Set when the first client has connected (``wait=on``).
        self.client_connected = threading.Event()

    # -- lifecycle (main thread) ---------------------------------------------

    def start(self) -> None:
        """Bind and listen, then serve in the monitor thread.

        :raises ConfigError: the socket cannot be created at ``path``.
        """
        if self._thread is not None:
            raise InternalError("QMPServer started twice")
        sock = self._listen_socket()
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="qmp-worker")
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name="qmp-monitor",
            daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            self._worker.shutdown()
            raise InternalError(
                f"QMP server failed to start: {self._start_error}")
        self.backend.add_event_listener(self._on_event)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver pending events, drop every client, remove the socket.

        Safe to call more than once and before ``start``.
        """
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self.backend.remove_event_listener(self._on_event)
        # FIFO with call_soon_threadsafe: events emitted before close()
        # (SHUTDOWN) reach the clients before they are disconnected.
        with contextlib.suppress(RuntimeError):   # loop already gone
            loop.call_soon_threadsafe(self._request_stop)
        thread.join(timeout)
        if thread.is_alive():
            _log.error("QMP monitor thread did not stop in %.0f s",
                       timeout)
        self._thread = None
        if self._worker is not None:
            # A command still running in the backend is not waited for.
            self._worker.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> QMPServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _listen_socket(self) -> socket.socket:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(
                    f"Failed to bind socket to {self.path}: "
                    "Address already in use")
        # Bind under a temporary name, make it 0600, listen, and only
        # then rename it into place: whoever sees the path can connect
        # (no ECONNREFUSED window between bind and listen) and it never
        # has the umask's permissions.  rename() also replaces a stale
        # socket atomically.  A path too long for a temporary sibling is
        # bound directly, which is still safe for the permissions since
        # nobody can connect before listen().
        tmp = self.path.with_name(f".{self.path.name[:8]}."
                                  f"{secrets.token_hex(4)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(os.fspath(tmp))
            except OSError:
                tmp = self.path
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                sock.bind(os.fspath(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(16)
            if tmp != self.path:
                os.rename(tmp, self.path)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                if tmp.is_socket():
                    tmp.unlink()
            raise ConfigError(
                f"Failed to bind socket to {self.path}: "
                f"{e.strerror}") from e
        sock.setblocking(False)
        return sock

    # -- the monitor thread ------------------------------------------------

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as e:
            self._start_error = e
            _log.exception("QMP monitor failed")
        finally:
            sock.close()
            self._started.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_unix_server(
            self._client_task, sock=sock, limit=_READ_SIZE)
        self._started.set()
        _log.info("QMP listening on %s", self.path)
        async with server:
            await self._stop.wait()
            server.close()
            for client in list(self._clients):
                await self._drain(client)
                client.writer.close()
            if self._tasks:
                _, pending = await asyncio.wait(list(self._tasks),
                                                timeout=5)
                for task in pending:        # stuck in a command
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1)

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _client_task(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(writer, self.pretty)
        self._clients.add(client)
        self.client_connected.set()
        client.log.debug("connected")
        try:
            await self._converse(client, reader)
        except (ConnectionError, OSError) as e:
            client.log.debug("connection lost: %s", e)
        except Exception:
            # A bug of ours: lose this client, keep serving the others.
            client.log.exception("QMP client failed")
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            client.log.debug("disconnected")

    async def _converse(self, client: _Client,
                        reader: asyncio.StreamReader) -> None:
        assert self._stop is not None
        loop = asyncio.get_running_loop()
        streamer = JSONStreamer(self._max_message)
        client.send(protocol.greeting())
        await self._drain(client)
        while not self._stop.is_set():
            data = await reader.read(_READ_SIZE)
            if not data:
                return
            for item in streamer.feed(data):
                if isinstance(item, ParseError):
                    client.log.debug("parse error: %s", item.desc)
                    client.send(protocol.error_response(item.desc))
                    if item.fatal:
                        await self._drain(client)
                        client.log.warning("dropped: %s", item.desc)
                        return
                    continue
                client.log.debug("-> %s", item)
                rsp = await loop.run_in_executor(
                    self._worker, self._dispatcher.dispatch,
                    client.session, item)
                if not client.send(rsp):
                    return           # gone while the command ran
                await self._drain(client)

    async def _drain(self, client: _Client) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await client.writer.drain()

    # -- events (any thread -> monitor thread) ------------------------------

    def _on_event(self, event: MonitorEvent) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):   # loop closed
            loop.call_soon_threadsafe(self._broadcast, event)

    def _broadcast(self, event: MonitorEvent) -> None:
        data = dict(event.data) if event.data is not None else None
        msg = protocol.event_message(event.name, data, event.timestamp_ns)
        for client in list(self._clients):
            # QEMU sends events only to monitors out of negotiation.
            if client.session.negotiated:
                client.send(msg)
