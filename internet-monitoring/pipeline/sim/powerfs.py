"""A FUSE file system that can lose power, and fail writes and fsyncs on request.

SIGKILL is not a power cut: the kernel still holds every write the process made and
writes it out later. A power cut loses whatever was not made durable, so this file
system keeps, per file, the content at its last successful ``fsync`` next to the current
content, and per directory the names at its last ``fsync`` of the directory (SQLite
fsyncs the directory after creating a journal or WAL, and so does ``Reserve``). On
``cut`` every file goes back to its durable content and the directory to its durable
names: a file created and written but never synced is gone; one unlinked or renamed since
the last directory sync is back. That is the worst case a file system may legally leave
(ext4 and friends usually keep more), which is what a durability test wants.

It also injects I/O errors: ``fail`` makes the next N (or every) ``write`` or ``fsync``
of files whose name contains a given text fail with EIO or ENOSPC, until ``clear``.

The file system is flat (one directory, regular files only) and lives in memory: it holds
a database file and its companions for a test, nothing more. It runs single-threaded, so
every operation and every control command happen in one order.

Run: ``python -m pipeline.sim.powerfs MOUNTPOINT --control SOCKET`` (root, or a user
allowed to mount FUSE). Control: one JSON object per line on the Unix socket, answered by
one JSON line: ``{"cmd": "cut"}``, ``{"cmd": "fail", "op": "fsync", "errno": "EIO",
"count": 1, "match": "-wal"}`` (``count`` null = until cleared), ``{"cmd": "clear"}``,
``{"cmd": "status"}``. ``PowerFS`` below drives it from Python.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OPS = ("write", "fsync")
ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
_BLOCK = 4096
_FREE_BLOCKS = 1 << 22  # 16 GiB free as far as statvfs is concerned


class PowerFSError(RuntimeError):
    """The power-loss file system could not be started, driven or stopped."""


@dataclass
class _Node:
    """A file: its current bytes, its bytes at the last fsync, and the blocks written
    since (so an fsync costs what was written, not the size of the file)."""

    data: bytearray = field(default_factory=bytearray)
    durable: bytearray = field(default_factory=bytearray)
    dirty: set[int] = field(default_factory=set)
    resized: bool = False
    mode: int = 0o644
    mtime: float = field(default_factory=time.time)

    def touch(self, start: int, end: int) -> None:
        if end > start:
            self.dirty.update(range(start // _BLOCK, (end - 1) // _BLOCK + 1))

    def sync(self) -> None:
        size = len(self.data)
        if len(self.durable) != size:
            if len(self.durable) > size:
                del self.durable[size:]
            else:
                self.durable.extend(bytes(size - len(self.durable)))
        for block in self.dirty:
            start = block * _BLOCK
            if start < size:
                self.durable[start:start + _BLOCK] = self.data[start:start + _BLOCK]
        self.dirty.clear()
        self.resized = False

    @property
    def unsynced(self) -> bool:
        return bool(self.dirty) or self.resized or len(self.data) != len(self.durable)


@dataclass
class _Fault:
    op: str
    error: int
    remaining: int | None  # None: until cleared
    match: str


class PowerState:
    """The file system's state and its power semantics, without FUSE (sans-I/O)."""

    def __init__(self) -> None:
        self.nodes: dict[int, _Node] = {}
        self.names: dict[str, int] = {}
        self.durable_names: dict[str, int] = {}
        self.handles: dict[int, int] = {}  # fh -> node id
        self.faults: list[_Fault] = []
        self.counts = {"writes": 0, "fsyncs": 0, "dir_fsyncs": 0, "cuts": 0,
                       "faults_injected": 0, "bytes_lost": 0}
        self._next_node = 1
        self._next_fh = 1
        self.lock = threading.Lock()

    # -- names and handles -------------------------------------------------------

    def node(self, name: str) -> _Node:
        try:
            return self.nodes[self.names[name]]
        except KeyError:
            raise OSError(errno.ENOENT, name) from None

    def create(self, name: str, mode: int) -> int:
        node_id = self._next_node
        self._next_node += 1
        self.nodes[node_id] = _Node(mode=mode & 0o7777)
        self.names[name] = node_id
        return self._handle(node_id)

    def open(self, name: str) -> int:
        if name not in self.names:
            raise OSError(errno.ENOENT, name)
        return self._handle(self.names[name])

    def _handle(self, node_id: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = node_id
        return fh

    def by_handle(self, fh: int | None, name: str) -> _Node:
        if fh is not None and fh in self.handles:
            node = self.nodes.get(self.handles[fh])
            if node is not None:
                return node
        return self.node(name)

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)
        self._collect()

    def unlink(self, name: str) -> None:
        if self.names.pop(name, None) is None:
            raise OSError(errno.ENOENT, name)
        self._collect()

    def rename(self, old: str, new: str) -> None:
        if old not in self.names:
            raise OSError(errno.ENOENT, old)
        self.names[new] = self.names.pop(old)
        self._collect()

    def _collect(self) -> None:
        """Forget nodes no name, durable name or open handle refers to."""
        live = set(self.names.values()) | set(self.durable_names.values()) \
            | set(self.handles.values())
        for node_id in [n for n in self.nodes if n not in live]:
            del self.nodes[node_id]

    # -- data ------------------------------------------------------------------------

    def write(self, node: _Node, name: str, data: bytes, offset: int) -> int:
        self._maybe_fail("write", name)
        self.counts["writes"] += 1
        end = offset + len(data)
        if len(node.data) < end:
            node.touch(len(node.data), end)
            node.data.extend(bytes(end - len(node.data)))
        node.data[offset:end] = data
        node.touch(offset, end)
        node.mtime = time.time()
        return len(data)

    def truncate(self, node: _Node, length: int) -> None:
        old = len(node.data)
        node.touch(min(old, length), max(old, length))
        node.resized = True
        if length < old:
            del node.data[length:]
        else:
            node.data.extend(bytes(length - old))
        node.mtime = time.time()

    def fsync(self, node: _Node, name: str) -> None:
        self._maybe_fail("fsync", name)
        self.counts["fsyncs"] += 1
        node.sync()

    def fsync_dir(self) -> None:
        self.counts["dir_fsyncs"] += 1
        self.durable_names = dict(self.names)
        self._collect()

    # -- power and faults --------------------------------------------------------------

    def cut(self) -> dict[str, int]:
        """Lose everything not made durable; returns what was lost."""
        lost = 0
        changed = 0
        for node in self.nodes.values():
            if node.unsynced:
                changed += 1
                lost += len(node.dirty) * _BLOCK
            node.data = bytearray(node.durable)
            node.dirty.clear()
            node.resized = False
        vanished = len(set(self.names.items()) - set(self.durable_names.items()))
        self.names = dict(self.durable_names)
        self.handles.clear()
        self._collect()
        self.counts["cuts"] += 1
        self.counts["bytes_lost"] += lost
        return {"files_reverted": changed, "names_reverted": vanished, "bytes_lost": lost}

    def add_fault(self, op: str, error: str, count: int | None, match: str) -> None:
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}")
        if error not in ERRNOS:
            raise ValueError(f"errno must be one of {tuple(ERRNOS)}")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1 (or null: until cleared)")
        self.faults.append(_Fault(op, ERRNOS[error], count, match))

    def _maybe_fail(self, op: str, name: str) -> None:
        for fault in self.faults:
            if fault.op == op and fault.match in name:
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self.faults.remove(fault)
                self.counts["faults_injected"] += 1
                raise OSError(fault.error, f"injected {op} failure on {name}")

    def status(self) -> dict[str, Any]:
        return {**self.counts, "files": sorted(self.names),
                "faults": [{"op": f.op, "errno": errno.errorcode[f.error],
                            "remaining": f.remaining, "match": f.match} for f in self.faults]}

    def command(self, doc: dict[str, Any]) -> dict[str, Any]:
        """One control command (already decoded); the answer to send back."""
        cmd = doc.get("cmd")
        with self.lock:
            if cmd == "cut":
                return {"ok": True, **self.cut()}
            if cmd == "fail":
                self.add_fault(str(doc.get("op")), str(doc.get("errno", "EIO")),
                               doc.get("count"), str(doc.get("match", "")))
                return {"ok": True}
            if cmd == "clear":
                self.faults.clear()
                return {"ok": True}
            if cmd == "status":
                return {"ok": True, **self.status()}
        raise ValueError(f"unknown command {cmd!r}")


def _operations(state: PowerState) -> Any:
    """The FUSE callbacks (mfusepy's high-level API), each under the state's lock."""
    import mfusepy

    def fuse_errors(func: Any) -> Any:
        def wrapper(self: Any, path: str, *args: Any) -> Any:
            with state.lock:
                try:
                    return func(self, path.lstrip("/"), *args)
                except OSError as exc:
                    raise mfusepy.FuseOSError(exc.errno or errno.EIO) from exc
        wrapper.__name__ = func.__name__
        return wrapper

    class Operations(mfusepy.Operations):
        @fuse_errors
        def getattr(self, name: str, fh: int | None = None) -> dict[str, Any]:
            now = time.time()
            if not name:
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0,
                        "st_mtime": now, "st_ctime": now, "st_atime": now}
            node = state.by_handle(fh, name) if fh else state.node(name)
            return {"st_mode": stat.S_IFREG | node.mode, "st_nlink": 1,
                    "st_size": len(node.data), "st_mtime": node.mtime,
                    "st_ctime": node.mtime, "st_atime": node.mtime,
                    "st_blocks": (len(node.data) + 511) // 512, "st_blksize": _BLOCK}

        @fuse_errors
        def readdir(self, name: str, fh: int) -> list[str]:
            return [".", "..", *sorted(state.names)]

        @fuse_errors
        def create(self, name: str, mode: int, fi: Any = None) -> int:
            if "/" in name:
                raise OSError(errno.EPERM, "flat file system")
            if name in state.names:
                return state.open(name)
            return state.create(name, mode)

        @fuse_errors
        def open(self, name: str, flags: int) -> int:
            fh = state.open(name)
            if flags & os.O_TRUNC:
                state.truncate(state.by_handle(fh, name), 0)
            return fh

        @fuse_errors
        def read(self, name: str, size: int, offset: int, fh: int) -> bytes:
            return bytes(state.by_handle(fh, name).data[offset:offset + size])

        @fuse_errors
        def write(self, name: str, data: bytes, offset: int, fh: int) -> int:
            return state.write(state.by_handle(fh, name), name, bytes(data), offset)

        @fuse_errors
        def truncate(self, name: str, length: int, fh: int | None = None) -> int:
            state.truncate(state.by_handle(fh, name), length)
            return 0

        @fuse_errors
        def fsync(self, name: str, datasync: int, fh: int) -> int:
            state.fsync(state.by_handle(fh, name), name)
            return 0

        @fuse_errors
        def fsyncdir(self, name: str, datasync: int, fh: int) -> int:
            state.fsync_dir()
            return 0

        @fuse_errors
        def flush(self, name: str, fh: int) -> int:
            return 0

        @fuse_errors
        def release(self, name: str, fh: int) -> int:
            state.release(fh)
            return 0

        @fuse_errors
        def unlink(self, name: str) -> int:
            state.unlink(name)
            return 0

        @fuse_errors
        def rename(self, old: str, new: str) -> int:
            state.rename(old, new.lstrip("/"))
            return 0

        @fuse_errors
        def chmod(self, name: str, mode: int) -> int:
            if name:
                state.node(name).mode = mode & 0o7777
            return 0

        @fuse_errors
        def chown(self, name: str, uid: int, gid: int) -> int:
            return 0

        @fuse_errors
        def utimens(self, name: str, times: Any = None) -> int:
            return 0

        @fuse_errors
        def statfs(self, name: str) -> dict[str, int]:
            used = sum(len(n.data) for n in state.nodes.values()) // _BLOCK
            return {"f_bsize": _BLOCK, "f_frsize": _BLOCK, "f_blocks": _FREE_BLOCKS + used,
                    "f_bfree": _FREE_BLOCKS, "f_bavail": _FREE_BLOCKS, "f_files": 1 << 20,
                    "f_ffree": 1 << 20, "f_favail": 1 << 20, "f_namemax": 255}

    return Operations()


def _serve_control(state: PowerState, path: Path) -> None:
    """Answer control commands on a Unix socket (a daemon thread)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def answer(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                try:
                    reply = state.command(json.loads(line))
                except (ValueError, TypeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    while True:
        conn, _ = server.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def serve(mountpoint: Path, control: Path) -> None:
    """Mount and serve until unmounted (blocks)."""
    import mfusepy

    state = PowerState()
    threading.Thread(target=_serve_control, args=(state, control), daemon=True,
                     name="powerfs-control").start()
    mfusepy.FUSE(_operations(state), str(mountpoint), foreground=True, nothreads=True,
                 attr_timeout=0, entry_timeout=0, negative_timeout=0, fsname="powerfs")


class PowerFS:
    """Starts the file system in its own process and drives it (tests, campaigns)."""

    def __init__(self, mountpoint: Path, *, log_path: Path | None = None) -> None:
        self.mountpoint = mountpoint
        self.control = mountpoint.parent / f".{mountpoint.name}.powerfs.sock"
        self.log_path = log_path or mountpoint.parent / f"{mountpoint.name}.powerfs.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> PowerFS:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.control.unlink(missing_ok=True)
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.sim.powerfs", str(self.mountpoint),
                 "--control", str(self.control)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (os.path.ismount(self.mountpoint) and self.control.exists()):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PowerFSError(f"powerfs did not mount {self.mountpoint}: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.02)
        return self

    def command(self, **doc: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(str(self.control))
            conn.sendall(json.dumps(doc).encode() + b"\n")
            with conn.makefile("rb") as stream:
                reply = json.loads(stream.readline())
        if not reply.get("ok"):
            raise PowerFSError(f"powerfs refused {doc}: {reply.get('error')}")
        return reply

    def cut(self) -> dict[str, Any]:
        """Power cut: every file back to its last fsync (stop the writers first)."""
        return self.command(cmd="cut")

    def fail(self, op: str, error: str = "EIO", *, count: int | None = 1,
             match: str = "") -> None:
        self.command(cmd="fail", op=op, errno=error, count=count, match=match)

    def clear(self) -> None:
        self.command(cmd="clear")

    def status(self) -> dict[str, Any]:
        return self.command(cmd="status")

    def stop(self) -> None:
        if os.path.ismount(self.mountpoint):
            for argv in (["fusermount", "-u", str(self.mountpoint)],
                         ["umount", str(self.mountpoint)],
                         ["umount", "-l", str(self.mountpoint)]):
                if subprocess.run(argv, capture_output=True).returncode == 0:
                    break
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        self.control.unlink(missing_ok=True)

    def __enter__(self) -> PowerFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sim.powerfs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", type=Path, required=True,
                        help="Unix socket for cut/fail/clear/status commands")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    serve(args.mountpoint, args.control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
