"""LangGraph's ``AsyncPostgresSaver`` as a benchmark peer, on a throwaway local server.

    async with postgres_saver(root) as peer:
        if isinstance(peer, str):
            print(peer)  # why PostgreSQL is not measured on this machine
        else:
            ...  # measure ``peer`` like any other saver

``postgres_saver`` looks for a PostgreSQL server (``initdb``, ``pg_ctl`` and ``postgres``
in one directory, on ``PATH`` or under ``/usr/lib/postgresql/*/bin``) and for the
``langgraph-checkpoint-postgres`` and ``psycopg`` packages. With both, it creates a cluster
under ``root`` with trust authentication, starts it on a free port of 127.0.0.1 and yields
a set-up saver; on exit it stops the server and deletes the cluster. Without them, or when
the server does not start, it yields a one-line reason instead of raising, so a benchmark
can print it and go on with the other savers.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver

NAME = "AsyncPostgresSaver"
SUPERUSER = "postgres"
SERVER_USERS = ("postgres", "nobody")
"""Who runs the server when we are root (PostgreSQL refuses to), in order of preference."""
START_TIMEOUT_S = 60


def _server_bindir() -> Path | None:
    """The first directory holding all three server programs, ``PATH`` first."""
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        # Resolved, since ``/usr/local/bin/pg_ctl`` may be a lone symlink into the real bindir.
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda bindir: [int(part) for part in bindir.parent.name.split(".") if part.isdigit()],
        reverse=True,
    )
    for bindir in candidates:
        if all(
            os.access(bindir / program, os.X_OK) for program in ("initdb", "pg_ctl", "postgres")
        ):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _gist(text: str) -> str:
    """The line of a tool's output or server log that says what went wrong."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    for line in lines:
        # A server log ends with "database system is shut down"; the cause is the FATAL.
        for severity in ("FATAL:", "PANIC:"):
            if severity in line:
                return line[line.index(severity) :]
    return lines[-1] if lines else "no output"


class _Cluster:
    """One throwaway PostgreSQL cluster in its own directory under ``root``."""

    def __init__(self, root: Path, bindir: Path) -> None:
        self.bindir = bindir
        self.root = root
        # Unique, so that clusters of several runs sharing ``root`` never collide.
        self.home = Path(tempfile.mkdtemp(prefix="postgres-", dir=root))
        self.data = self.home / "data"
        self.log = self.home / "server.log"
        self.port = _free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres"
        self.run_as: dict[str, Any] = {}

    def _prepare(self) -> str | None:
        """Hand the cluster's directory to whoever will run the server."""
        if os.geteuid() != 0:
            return None
        for name in SERVER_USERS:
            try:
                user = pwd.getpwnam(name)
            except KeyError:
                continue
            # Drop root's supplementary groups too, or the server would keep them.
            self.run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            os.chown(self.home, user.pw_uid, user.pw_gid)
            # ``root`` is usually a 0700 mkdtemp of the root user: the server user must traverse it.
            self.root.chmod(self.root.stat().st_mode | stat.S_IXOTH)
            return None
        return f"running as root and no {' or '.join(SERVER_USERS)} user to run the server"

    async def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(self.bindir / program), *args],
                # The caller's directory may be closed to the server user.
                cwd=self.home,
                capture_output=True,
                text=True,
                check=False,
                **self.run_as,
            )

        # In a thread: initdb takes about half a second, the event loop need not stall.
        return await asyncio.to_thread(run)

    async def start(self) -> str | None:
        """Initialise and start the server; the reason it could not, if it could not."""
        problem = self._prepare()
        if problem is not None:
            return problem
        init = await self._run(
            "initdb",
            f"--pgdata={self.data}",
            f"--username={SUPERUSER}",
            "--auth=trust",
            # C locale: the machine's locale may be unset or not generated.
            "--locale=C",
            "--encoding=UTF8",
            # Throwaway cluster: not worth flushing to disk before the server starts.
            "--no-sync",
        )
        if init.returncode != 0:
            return f"initdb failed: {_gist(init.stderr)}"
        # TCP on loopback, like the local Kusto stack the other peers talk to, and no Unix
        # socket: the default socket directory may not be writable by the server user.
        # fsync and the rest stay at their defaults, so commits are as durable as deployed.
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                "unix_socket_directories = ''\n"
            )
        started = await self._run(
            "pg_ctl",
            f"--pgdata={self.data}",
            f"--log={self.log}",
            "--wait",
            f"--timeout={START_TIMEOUT_S}",
            "start",
        )
        if started.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else started.stderr
            return f"server did not start: {_gist(log)}"
        return None

    async def stop(self) -> None:
        """Stop the server if it runs (it may after a start timeout), then delete the cluster."""
        if (self.data / "postmaster.pid").exists():
            await self._run("pg_ctl", f"--pgdata={self.data}", "--mode=fast", "--wait", "stop")
        shutil.rmtree(self.home, ignore_errors=True)


@asynccontextmanager
async def postgres_saver(root: Path) -> AsyncIterator[BaseCheckpointSaver | str]:
    """A set-up ``AsyncPostgresSaver`` on a fresh server under ``root``, or why not."""
    bindir = _server_bindir()
    if bindir is None:
        yield f"{NAME}: not measured (no PostgreSQL server binary on this machine)"
        return
    try:
        # Optional benchmark dependencies: without them the benchmark still runs.
        import psycopg
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    except ImportError as error:
        # psycopg's "no pq wrapper available" message goes on for lines: its first says it.
        missing = str(error).splitlines()[0]
        yield f"{NAME}: not measured ({missing}; install langgraph-checkpoint-postgres, psycopg)"
        return
    async with AsyncExitStack() as stack:
        cluster = _Cluster(root, bindir)
        stack.push_async_callback(cluster.stop)
        problem = await cluster.start()
        if problem is None:
            try:
                saver = await stack.enter_async_context(
                    AsyncPostgresSaver.from_conn_string(cluster.dsn)
                )
                await saver.setup()
            except psycopg.Error as error:
                problem = f"could not connect: {_gist(str(error))}"
        if problem is None:
            yield saver
        else:
            yield f"{NAME}: not measured ({problem})"
