"""The share: one device budget for several processes, with cooperative
eviction between them (the kernel's one TTM device for all its clients,
with the dmem cgroup's ``min``/``low``/``max`` per client).

Each member process's :class:`ShareMember` holds a *reservation*: device
bytes the share's ledger has granted it. The member's :class:`Resource`
uses the reservation as its local limit (``Resource.limit``), so its
charged bytes (resident BOs, pooled buffers, buffers in flight) never
exceed it; the ledger never grants more than the share's budget in all.
Hence the sum of every member's device bytes stays within the budget, at
every moment.

Parts, all real kernel objects (nothing here trusts a peer to behave):

* the directory ``$GPUBO_SHARE_DIR/NAME`` (default
  ``/dev/shm/gpubo-UID/NAME``), mode 0700, files 0600;
* ``lock``: ``flock``'d around every read-modify-write of the ledger; the
  kernel drops the lock when its holder dies, at any instruction;
* ``ledger.json``: the budget, the device, and one entry per member
  (pid, process start time, reservation, published usage, counters). It is
  replaced whole by ``rename``, never written in place, so a reader (also
  one without the lock: ``gpubo top``) sees the old ledger or the new one,
  never half of each, and a member killed mid-write leaves the old one;
* ``PID-N.sock``: each member's UNIX socket; a listener thread answers
  eviction requests on it, whatever the member's own threads are doing.

Order of steps that keeps the ledger an upper bound of the device bytes:
a member records a larger reservation *before* it allocates, and records a
smaller one only *after* it has released the device memory. A member that
dies between the two leaves its reservation larger than what it holds,
never smaller, and its charge is released when a peer sees it is gone.

Dead members: every ledger transaction (also each member's listener tick,
every :data:`TICK_S`) checks each entry's pid and its start time in
``/proc`` (a reused pid has another start time; a zombie counts as dead)
and drops the entries of processes that are gone. The OS has already
freed their device memory.

Lock order, within a process: ``Resource.lock`` -> :class:`Ledger`'s
thread lock -> the ``flock``. A holder of the ``flock`` waits for nothing
else, in any process, so the ``flock`` cannot be part of a deadlock.

Why two members asking each other cannot deadlock: an asker holds its own
``room_lock`` while it waits for a reply, for at most :data:`ASK_TIMEOUT_S`;
the serving side (the peer's listener thread) never waits on a lock that
an asker can hold while it waits: it only *try*-locks the peer's
``room_lock`` and its BOs (the non-blocking eviction walk,
:meth:`Evictor.give_back`), retrying for at most :data:`SERVE_TRY_S`, then
answers with what it could free. The one lock it waits for is the
ledger's ``flock`` (to record what it gives back), whose holders wait for
nothing. If A and B ask each other at once, both listeners find the other
``room_lock`` held, answer 0 within :data:`SERVE_TRY_S`, and both askers
go on (to the next member, their own BOs, or OutOfDeviceMemory). No thread
waits for another without a bound, so there is no cycle of waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import re
import socket
import stat
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpubo._errors import ShareError
from gpubo._groups import check_limits
from gpubo._units import format_bytes

__all__ = [
    "ASK_TIMEOUT_S",
    "LEDGER_VERSION",
    "SERVE_TRY_S",
    "TICK_S",
    "Ledger",
    "ShareMember",
    "ShareMemberStats",
    "check_share_args",
    "check_share_name",
    "list_shares",
    "process_start",
    "read_share",
    "share_directory",
    "share_root",
]

log = logging.getLogger(__name__)

LEDGER_FORMAT = "gpubo-share"
#: The ledger layout this gpubo reads and writes; another is refused.
LEDGER_VERSION = 1
#: How long an asker waits for one member's answer before asking the next.
ASK_TIMEOUT_S = 2.0
#: How long a serving member keeps try-locking before it answers with what it freed.
SERVE_TRY_S = 0.5
#: How often each member's listener publishes its usage and checks for dead members.
TICK_S = 0.1
#: How long a member waits for the ledger's lock before it gives up with ShareError.
LOCK_TIMEOUT_S = 10.0
#: A member that has not published its usage for this long is not asked (it is stopped or stuck).
STALE_S = 2.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_serial = itertools.count(1)
#: Integer fields every member entry must hold (anything else is a damaged ledger).
_MEMBER_INTS = ("pid", "start", "reserved", "charged", "min", "low")
#: Counters a member entry may hold.
_MEMBER_COUNTS = ("resident", "pinned", "evictable", "swapped", "sent", "served", "given")
_MEMBER_KEY = re.compile(r"[0-9]{1,10}-[0-9]{1,10}\Z")


@dataclass(frozen=True)
class ShareMemberStats:
    """One member of a share, as it last published itself (at most
    :data:`TICK_S` old; sizes in bytes, ``max_bytes`` None if uncapped)."""

    member: str
    pid: int
    command: str
    device: str
    reserved_bytes: int
    charged_bytes: int
    resident_bytes: int
    pinned_bytes: int
    evictable_bytes: int
    swapped_bytes: int
    min_bytes: int
    low_bytes: int
    max_bytes: int | None
    requests_sent: int
    requests_served: int
    bytes_given: int
    updated: float

    @classmethod
    def from_entry(cls, member: str, e: dict[str, Any]) -> ShareMemberStats:
        return cls(
            member=member,
            pid=e["pid"],
            command=str(e.get("command", "")),
            device=str(e.get("device", "")),
            reserved_bytes=e["reserved"],
            charged_bytes=e["charged"],
            resident_bytes=int(e.get("resident", 0)),
            pinned_bytes=int(e.get("pinned", 0)),
            evictable_bytes=int(e.get("evictable", 0)),
            swapped_bytes=int(e.get("swapped", 0)),
            min_bytes=e["min"],
            low_bytes=e["low"],
            max_bytes=e.get("max"),
            requests_sent=int(e.get("sent", 0)),
            requests_served=int(e.get("served", 0)),
            bytes_given=int(e.get("given", 0)),
            updated=float(e.get("updated", 0.0)),
        )


# -- names, directories, processes ---------------------------------------------------


def check_share_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"share must be a str or None, got {type(name).__name__}")
    if not _NAME.match(name):
        raise ValueError(
            f"share must be 1 to 64 letters, digits, '.', '_' or '-' (not starting with '.', "
            f"'_' or '-'), got {name!r}"
        )
    return name


def check_share_args(
    share: object, share_min: object, share_low: object, share_max: object
) -> tuple[str, tuple[int | None, int, int]] | None:
    """The share to join (``share``, else ``$GPUBO_SHARE``) and its limits
    (max, low, min), or None without a share.

    Raises:
        TypeError, ValueError: a bad name or limits, or limits without a share.
    """
    if share is None:
        share = os.environ.get("GPUBO_SHARE") or None
    if share is None:
        if (share_min, share_low, share_max) != (None, None, None):
            raise ValueError("share_min, share_low and share_max need a share")
        return None
    return check_share_name(share), check_limits(share_max, share_low, share_min, "share_")


def share_root() -> Path:
    """Where shares live: ``$GPUBO_SHARE_DIR``, else ``/dev/shm/gpubo-UID``,
    else ``$XDG_RUNTIME_DIR/gpubo``, else the temporary directory."""
    env = os.environ.get("GPUBO_SHARE_DIR")
    if env:
        return Path(env)
    uid = os.getuid()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return Path("/dev/shm") / f"gpubo-{uid}"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "gpubo"
    return Path(tempfile.gettempdir()) / f"gpubo-{uid}"


def _private(path: Path, create: bool) -> Path:
    """``path``, a directory of this user that no one else can use (made
    0700 if missing and ``create``).

    Raises:
        ShareError: it is not a directory, belongs to another user, or is
            open to others.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            os.makedirs(path, mode=0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ShareError(f"share directory {path} does not exist") from None
    except OSError as e:
        raise ShareError(f"cannot use share directory {path}: {e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise ShareError(f"share directory {path} is not a directory (a link or a file)")
    if st.st_uid != os.getuid():
        raise ShareError(
            f"share directory {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
        )
    if st.st_mode & 0o077:
        raise ShareError(
            f"share directory {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users could read "
            f"or change the ledger; make it private (chmod 700 {path})"
        )
    return path


def share_directory(name: str, create: bool = True) -> Path:
    """The private directory of share ``name`` (see :func:`_private`)."""
    root = _private(share_root(), create)
    return _private(root / check_share_name(name), create)


def list_shares() -> list[str]:
    """Names of the shares that have a ledger now."""
    try:
        root = _private(share_root(), create=False)
    except ShareError:
        return []
    return sorted(p.name for p in root.iterdir() if _NAME.match(p.name) and (p / "ledger.json").exists())


#: What :func:`process_start` says when it cannot tell (the process is taken as alive).
UNKNOWN_START = -1


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot, field 22 of
    ``/proc/PID/stat``); None if it is gone or a zombie; :data:`UNKNOWN_START`
    if ``/proc`` cannot say now (out of file descriptors, say): only a
    process known to be gone is ever taken for dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # (PermissionError: hidepid, another user's process: not a member's)
    except OSError:
        return UNKNOWN_START
    try:
        fields = data[data.rindex(b")") + 2 :].split()  # the command may hold spaces and parentheses
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (ValueError, IndexError):
        return UNKNOWN_START


def _alive(m: dict[str, Any]) -> bool:
    """Whether the member entry ``m``'s process still runs (pid and start time)."""
    start = process_start(m["pid"])
    return start == UNKNOWN_START or start == m["start"]


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 if unknown): members of
    one share must see each other's pids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _command() -> str:
    """This process's command line, the program's directory left out."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            words = f.read().decode(errors="replace").split("\0")
    except OSError:
        words = list(sys.argv)
    words[0] = os.path.basename(words[0])
    return " ".join(words).strip()[:200]


# -- the ledger ------------------------------------------------------------------------


class LockBusy(ShareError):
    """The ledger's lock stayed held by another process."""


class Ledger:
    """The ledger of one share and its lock (see the module docstring).

    Notes:
        Thread-safe: a thread lock serializes this process's transactions
        on one ledger (``flock`` excludes other open files, not threads that
        share one).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "ledger.json"
        self._thread_lock = threading.Lock()
        lock_path = directory / "lock"
        try:
            self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise ShareError(f"cannot open the share's lock file {lock_path}: {e}") from e
        st = os.fstat(self._fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            os.close(self._fd)
            raise ShareError(
                f"the share's lock file {lock_path} is not private to this user "
                f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
            )

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        with self._thread_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the ledger's lock (this process's threads, then other processes).

        Raises:
            ShareError: another process has held it for ``timeout`` seconds
                (stopped in a debugger, say: a dead one's lock is released by
                the kernel; :class:`LockBusy` if so), or the ledger's files failed.
        """
        with self._thread_lock:
            if self._fd < 0:
                raise ShareError("this process is no longer a member of the share")
            deadline = time.monotonic() + timeout
            pause = 0.0002
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusy(
                            f"the share's lock {self.directory / 'lock'} has been held by another "
                            f"process for {timeout:g} s (is a member stopped?)"
                        ) from None
                    time.sleep(pause)
                    pause = min(2 * pause, 0.001)
                except OSError as e:
                    raise ShareError(f"cannot lock the share's ledger: {e}") from e
            try:
                yield
            except OSError as e:
                raise ShareError(f"the share's ledger in {self.directory} failed: {e}") from e
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's lock file (the child shares its
        open file, so its flock would be the parent's) without unlocking it."""
        self._thread_lock = threading.Lock()
        if self._fd >= 0:
            os.close(self._fd)  # closing a duplicate does not release the parent's flock
            self._fd = -1

    def load(self) -> dict[str, Any] | None:
        """The ledger, validated, or None if there is none.

        Raises:
            ShareError: it is damaged or of another version.
        """
        return read_ledger(self.path)

    def save(self, state: dict[str, Any] | None) -> None:
        """Replace the ledger whole (None: delete it). Hold :meth:`locked`."""
        if state is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        data = json.dumps(state, separators=(",", ":")).encode()
        tmp = self.directory / f".ledger.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


def read_ledger(path: Path) -> dict[str, Any] | None:
    """Read and validate a ledger file without its lock (it is replaced
    whole, so any read sees one complete version); None if it is missing.

    Raises:
        ShareError: damaged (not JSON, wrong fields, more granted than the
            budget) or of another version.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ShareError(f"cannot read the share ledger {path}: {e}") from e
    try:
        state = json.loads(raw)
    except ValueError as e:
        raise ShareError(f"the share ledger {path} is damaged ({e}); remove it when no member runs") from None
    if not isinstance(state, dict) or state.get("format") != LEDGER_FORMAT:
        raise ShareError(f"{path} is not a gpubo share ledger; remove it when no member runs")
    if state.get("version") != LEDGER_VERSION:
        raise ShareError(
            f"the share ledger {path} is version {state.get('version')!r}; this gpubo reads version "
            f"{LEDGER_VERSION} (let the other version's members finish, or use another share)"
        )
    budget, members = state.get("budget"), state.get("members")
    if type(budget) is not int or budget <= 0 or not isinstance(state.get("device"), str):
        raise ShareError(
            f"the share ledger {path} is damaged (budget or device); remove it when no member runs"
        )
    if not isinstance(members, dict):
        raise ShareError(f"the share ledger {path} is damaged (members); remove it when no member runs")
    total = 0
    for key, m in members.items():
        if not (_MEMBER_KEY.match(key) and isinstance(m, dict) and _member_ok(m)):
            raise ShareError(
                f"the share ledger {path} is damaged (member {key!r}); remove it when no member runs"
            )
        total += m["reserved"]
    if total > budget:
        raise ShareError(
            f"the share ledger {path} is damaged: it grants {format_bytes(total)} of a "
            f"{format_bytes(budget)} budget; remove it when no member runs"
        )
    return state


def _member_ok(m: dict[str, Any]) -> bool:
    """Every field of a member entry has its type (optional ones may be absent)."""

    def count(v: object) -> bool:
        return type(v) is int and v >= 0

    oldest = m.get("oldest")
    return (
        all(count(m.get(k)) for k in _MEMBER_INTS)
        and all(count(m[k]) for k in _MEMBER_COUNTS if k in m)
        and (m.get("max") is None or count(m["max"]))
        and (oldest is None or (type(oldest) in (int, float) and math.isfinite(oldest)))
        and type(m.get("updated", 0.0)) in (int, float)
        and all(isinstance(m.get(k, ""), str) for k in ("command", "device"))
    )


def read_share(name: str) -> tuple[dict[str, Any] | None, list[ShareMemberStats]]:
    """A share's ledger and its live members' rows, read without its lock
    (for ``gpubo top``: it never changes the share)."""
    directory = share_directory(name, create=False)
    state = read_ledger(directory / "ledger.json")
    if state is None:
        return None, []
    rows = [ShareMemberStats.from_entry(k, m) for k, m in state["members"].items() if _alive(m)]
    return state, rows


def _reap(state: dict[str, Any], directory: Path, me: str | None) -> bool:
    """Drop the entries of members whose process is gone; True if any was."""
    dead = [k for k, m in state["members"].items() if k != me and not _alive(m)]
    for k in dead:
        m = state["members"].pop(k)
        with contextlib.suppress(OSError):
            os.unlink(directory / f"{k}.sock")
        log.warning(
            "share %s: member %s (pid %d) is gone; its %s reservation is released",
            directory.name,
            k,
            m["pid"],
            format_bytes(m["reserved"]),
        )
    return bool(dead)


# -- a member ------------------------------------------------------------------------

#: Every member of this process, so that a forked child can drop them.
_MEMBERS: weakref.WeakSet[ShareMember] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for member in list(_MEMBERS):
        member.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ShareMember:
    """This process's membership of a share (one per Manager).

    Lifecycle: :meth:`join` (checks and records the entry), :meth:`attach`
    (the manager's pieces; starts the listener), :meth:`leave`.

    Notes:
        ``reserved`` changes only with ``Resource.lock`` and the ledger's
        lock both held, once the ledger is saved; ``Resource.limit`` under
        ``Resource.lock``, never above ``reserved``; the counters only
        on the listener thread (``served``, ``given``) or under
        ``Resource.lock`` (``sent``).
    """

    def __init__(
        self,
        name: str,
        limits: tuple[int | None, int, int],
        budget: int | None,
        default_budget: int,
        device: str,
    ) -> None:
        self.name = check_share_name(name)
        self.directory = share_directory(name)
        self.max_bytes, self.low_bytes, self.min_bytes = limits
        self.device = device
        self.id = f"{os.getpid()}-{next(_serial)}"
        self.socket_path = self.directory / f"{self.id}.sock"
        if len(os.fsencode(self.socket_path)) > 107:
            raise ValueError(
                f"the share directory {self.directory} is too long for a UNIX socket path; "
                "set GPUBO_SHARE_DIR to a shorter one"
            )
        self.reserved = 0
        self.sent = self.served = self.given = 0
        self._asking = 0  # this member's threads now waiting for a peer's answer
        self._pid = os.getpid()
        start = process_start(self._pid)
        if start is None or start == UNKNOWN_START:
            raise ShareError("a device share needs /proc to tell live members from dead ones (Linux)")
        self._start = start
        self._command = _command()
        self._res: Any = None
        self._serve: Callable[[int, int, float], tuple[int, bool]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ledger = Ledger(self.directory)
        try:
            self.budget = self._join(budget, default_budget)
        except BaseException:
            self._close_socket()
            self.ledger.close()
            raise
        self.cap = self.budget if self.max_bytes is None else min(self.max_bytes, self.budget)
        self.step = max(1 << 20, min(self.budget // 64, 64 << 20))
        _MEMBERS.add(self)

    def forget_after_fork(self) -> None:
        """In a forked child: this is the parent's membership. Drop its files
        without touching the ledger, the parent's lock or its socket; the
        child's calls that need the share raise ShareError."""
        self._stop.set()
        self._thread = None
        if self._res is not None:
            self._res.limit = 0  # the parent's reservation is not the child's (its lock is a fresh copy's)
        self.ledger.forget_after_fork()
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()  # a copy of the parent's listening socket; its path stays the parent's

    def _join(self, budget: int | None, default_budget: int) -> int:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a dead member of this pid's earlier life
        self._sock.bind(os.fspath(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._sock.listen(16)
        with self.ledger.locked():
            state = self.ledger.load()
            if state is not None and state.get("pidns", 0) != _pid_namespace():
                # Checked before any reaping: its members' pids mean nothing here.
                raise ValueError(
                    f"share {self.name!r} belongs to processes of another pid namespace (another "
                    f"container): members must see each other's processes (or remove {self.directory} "
                    "when none of them runs)"
                )
            if state is not None:
                _reap(state, self.directory, None)
                if not state["members"]:
                    state = None  # an empty share takes the joiner's budget
            if state is None:
                state = {
                    "format": LEDGER_FORMAT,
                    "version": LEDGER_VERSION,
                    "name": self.name,
                    "budget": budget if budget is not None else default_budget,
                    "device": self.device,
                    "pidns": _pid_namespace(),
                    "members": {},
                }
            else:
                if budget is not None and budget != state["budget"]:
                    raise ValueError(
                        f"budget {format_bytes(budget)} ({budget} bytes) differs from share "
                        f"{self.name!r}'s budget {format_bytes(state['budget'])} ({state['budget']} bytes); "
                        "omit budget to join with the share's"
                    )
                if self.device != state["device"]:
                    raise ValueError(
                        f"device {self.device!r} differs from share {self.name!r}'s device "
                        f"{state['device']!r}: members of a share use one device"
                    )
            if self.min_bytes > state["budget"]:
                raise ValueError(
                    f"share_min {format_bytes(self.min_bytes)} exceeds share {self.name!r}'s budget "
                    f"{format_bytes(state['budget'])}"
                )
            others_min = sum(m["min"] for m in state["members"].values())
            if others_min + self.min_bytes > state["budget"]:
                raise ValueError(
                    f"share_min {format_bytes(self.min_bytes)} and the other members' "
                    f"{format_bytes(others_min)} exceed share {self.name!r}'s budget "
                    f"{format_bytes(state['budget'])}"
                )
            state["members"][self.id] = self._entry({})
            self.ledger.save(state)
        log.info("joined share %s as %s (budget %s)", self.name, self.id, format_bytes(state["budget"]))
        return int(state["budget"])

    def attach(self, resource: Any, serve: Callable[[int, int, float], tuple[int, bool]]) -> None:
        """Wire the manager's resource and its non-blocking eviction
        (``serve(nbytes, floor, deadline)``: device bytes freed, never
        leaving fewer than ``floor`` charged, and whether another thread
        was making room), then start the listener."""
        self._res = resource
        self._serve = serve
        self._thread = threading.Thread(target=self._listen, name=f"gpubo-share-{self.id}", daemon=True)
        self._thread.start()

    # -- entries ------------------------------------------------------------------

    def _usage_locked(self) -> dict[str, Any]:
        """This member's usage from its resource (its lock held)."""
        res = self._res
        if res is None:
            return {}
        c = res.counters
        oldest = res.oldest_idle_locked()
        return {
            "charged": res.charged_bytes,
            "resident": c.resident_bytes,
            "pinned": res.pinned_bytes,
            "evictable": c.resident_bytes - res.pinned_bytes,
            "swapped": c.swapped_bytes,
            "oldest": oldest,
        }

    def _entry(self, usage: dict[str, Any], reserved: int | None = None) -> dict[str, Any]:
        return {
            "pid": self._pid,
            "start": self._start,
            "command": self._command,
            "device": self.device,
            "reserved": self.reserved if reserved is None else reserved,
            "charged": usage.get("charged", 0),
            "resident": usage.get("resident", 0),
            "pinned": usage.get("pinned", 0),
            "evictable": usage.get("evictable", 0),
            "swapped": usage.get("swapped", 0),
            "oldest": usage.get("oldest"),
            "min": self.min_bytes,
            "low": self.low_bytes,
            "max": self.max_bytes,
            "sent": self.sent,
            "served": self.served,
            "given": self.given,
            "updated": time.time(),
        }

    def _transact(
        self,
        change: Callable[[dict[str, Any]], int | None],
        usage: dict[str, Any],
        publish: bool = False,
        timeout: float = LOCK_TIMEOUT_S,
    ) -> int | None:
        """Load the ledger, drop dead members, ask ``change`` for this
        member's new reservation (None: unchanged), and if there is one (or
        ``publish``, or a dead member was dropped) write this member's entry
        and save. Returns the new reservation once it is saved; the caller
        sets ``reserved`` (and ``Resource.limit``) only then, so a failed
        write changes nothing. The caller holds ``Resource.lock`` if the
        reservation may change.

        Raises:
            ShareError: the ledger is damaged, its files failed, or this
                member's entry is gone; nothing changed.
        """
        if os.getpid() != self._pid:
            raise ShareError(
                "a forked child is not a member of its parent's share (open a Manager of its own)"
            )
        with self.ledger.locked(timeout):
            state = self.ledger.load()
            if state is None or self.id not in state["members"]:
                raise ShareError(
                    f"share {self.name!r}: this member's entry is gone from {self.ledger.path} "
                    "(was the share directory removed?)"
                )
            reaped = _reap(state, self.directory, self.id)
            new = change(state)
            if new is not None or publish or reaped:
                state["members"][self.id] = self._entry(usage, new)
                self.ledger.save(state)
            return new

    # -- the resource's side (Resource.lock held) --------------------------------------

    def grow_locked(self, total: int) -> bool:
        """Grow the reservation so that ``total`` charged bytes fit, if the
        share has the room (plus up to :attr:`step` spare, to spare the
        ledger a transaction per allocation). Sets ``Resource.limit``."""
        if total > self.cap:
            return False

        def grow(state: dict[str, Any]) -> int | None:
            others = sum(m["reserved"] for k, m in state["members"].items() if k != self.id)
            room: int = state["budget"] - others - self.reserved
            want = total - self.reserved
            if room < want:
                return None
            return self.reserved + min(room, want + self.step, self.cap - self.reserved)

        grown = self._transact(grow, self._usage_locked())
        if grown is None:
            return False
        self.reserved = self._res.limit = grown
        return True

    def _release_locked(self, keep: int, timeout: float = LOCK_TIMEOUT_S) -> int:
        """Give back reservation beyond the charge plus ``keep`` spare bytes; bytes given."""
        res = self._res
        target = min(self.reserved, int(res.charged_bytes) + keep)
        if target >= self.reserved:
            return 0
        release = self.reserved - target
        # Lowered here first: from now on nothing is charged above the target,
        # whether or not the ledger's write succeeds (then it records more).
        res.limit = target
        self._transact(lambda state: target, self._usage_locked(), timeout=timeout)
        self.reserved = target
        return release

    # -- asking (no lock held but this manager's room_lock) --------------------------

    def peers(self) -> list[tuple[str, dict[str, Any]]]:
        """The live members other than this one, read without the lock (the
        ledger is replaced whole; dead members are skipped here and dropped
        by the next transaction)."""
        state = self.ledger.load()
        if state is None:
            return []
        return [(k, m) for k, m in state["members"].items() if k != self.id and _alive(m)]

    def ask_peers(self, nbytes: int, older_than: float | None) -> int:
        """Ask peers to give back ``nbytes`` of reservation; bytes given.

        Members holding spare reservation are asked first (it costs them no
        eviction), then those whose oldest idle BO is oldest; with
        ``older_than`` only those whose oldest idle BO was last used before
        it (one LRU clock: the system's monotonic clock). Members within
        their ``low`` are asked only without ``older_than`` (when nothing
        else helps), in a last round; a member within its ``min`` gives
        only spare reservation. Each member is waited for
        at most :data:`ASK_TIMEOUT_S`; the first that gives ends the round.
        """
        self._asking += 1
        try:
            return self._ask_round(self.peers(), nbytes, older_than)
        finally:
            self._asking -= 1

    def _ask_round(
        self, peers: list[tuple[str, dict[str, Any]]], nbytes: int, older_than: float | None
    ) -> int:
        now = time.time()
        # A member that has not published for a while is stopped or stuck: asking it only waits.
        peers = [p for p in peers if now - p[1].get("updated", 0.0) < STALE_S]
        spare = sorted(
            (p for p in peers if p[1]["reserved"] > p[1]["charged"]),
            key=lambda p: p[1]["charged"] - p[1]["reserved"],
        )
        idle = sorted(
            (
                p
                for p in peers
                if p[1].get("oldest") is not None
                and p[1].get("evictable", 0) > 0
                and (older_than is None or p[1]["oldest"] < older_than)
            ),
            key=lambda p: p[1]["oldest"],
        )
        asked: set[str] = set()
        rounds = [(False, spare), (False, idle)]
        if older_than is None:  # a low-protected member yields only when no one else can
            rounds.append((True, idle))
        for below_low, group in rounds:
            for key, m in group:
                if (not below_low and key in asked) or m["charged"] <= m["min"] >= m["reserved"]:
                    continue
                if (
                    not below_low
                    and m["charged"] <= max(m["min"], m["low"])
                    and m["reserved"] <= m["charged"]
                ):
                    continue  # within its low: only in the last round
                asked.add(key)
                given = self._ask(key, nbytes, below_low)
                if given > 0:
                    return given
        return 0

    def _ask(self, key: str, nbytes: int, below_low: bool) -> int:
        """One request: ``nbytes`` needed, at least a step asked for (several
        victims per request); what the member gave."""
        with self._res.lock:
            self.sent += 1
        path = os.fspath(self.directory / f"{key}.sock")
        message = {"need": nbytes, "give": max(nbytes, self.step), "below_low": below_low, "from": self.id}
        request = json.dumps(message).encode() + b"\n"
        try:
            deadline = time.monotonic() + ASK_TIMEOUT_S  # for the whole exchange
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(ASK_TIMEOUT_S)
                s.connect(path)
                s.settimeout(max(0.001, deadline - time.monotonic()))
                s.sendall(request)
                reply = _read_line(s, deadline)
            given: int = json.loads(reply)["given"]
            if type(given) is not int or given < 0:
                raise ValueError(f"bad reply {reply!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info(
                "share %s: member %s did not answer a request for %d bytes: %s", self.name, key, nbytes, e
            )
            return 0
        log.debug("share %s: member %s gave %d of %d bytes", self.name, key, given, nbytes)
        return given

    def describe(self) -> str:
        """Who holds what, for an OutOfDeviceMemory message."""
        try:
            state, rows = read_share(self.name)
        except ShareError as e:
            return f"share {self.name!r}: {e}"
        parts = [
            f"pid {r.pid}{' (this process)' if r.member == self.id else ''}: "
            f"{format_bytes(r.reserved_bytes)} reserved, {format_bytes(r.resident_bytes)} resident, "
            f"{format_bytes(r.pinned_bytes)} pinned"
            for r in rows
        ]
        budget = format_bytes(state["budget"]) if state else "?"
        return f"share {self.name!r} (budget {budget}): " + "; ".join(parts)

    # -- serving (the listener thread) --------------------------------------------------

    def _listen(self) -> None:
        self._sock.settimeout(TICK_S)
        next_tick = time.monotonic() + TICK_S
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                conn = None
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(TICK_S)
                conn = None
            if conn is not None:
                with conn:
                    self._answer(conn)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                self._tick()

    def _answer(self, conn: socket.socket) -> None:
        received = time.monotonic()
        try:
            conn.settimeout(ASK_TIMEOUT_S)
            request = json.loads(_read_line(conn, received + ASK_TIMEOUT_S))
            nbytes, need = request["give"], request.get("need", request["give"])
            below_low = bool(request.get("below_low", False))
            if type(nbytes) is not int or type(need) is not int or not 0 < need <= nbytes:
                raise ValueError(f"bad request {request!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.info("share %s: ignored a malformed request: %s", self.name, e)
            return
        try:
            # The asker stops waiting ASK_TIMEOUT_S after it sent: evicting longer would be for no one.
            given = self.serve(nbytes, need, below_low, received + ASK_TIMEOUT_S / 2)
        except Exception as e:  # a failed eviction: this member keeps its BOs
            log.warning("share %s: serving a request for %d bytes failed: %s", self.name, nbytes, e)
            given = 0
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"given": given}).encode() + b"\n")

    def serve(self, nbytes: int, need: int, below_low: bool, deadline: float) -> int:
        """Give back reservation for a peer that needs ``need`` bytes and
        asks for up to ``nbytes``: spare reservation first (when it covers
        ``need``, nothing is evicted), else by the non-blocking eviction
        walk up to ``nbytes``, never below ``min``, nor below ``low`` unless
        ``below_low``, evicting until ``deadline``; reservation bytes given."""
        res = self._res
        floor = self.min_bytes if below_low else max(self.min_bytes, self.low_bytes)
        assert self._serve is not None
        retry_until = min(deadline, time.monotonic() + SERVE_TRY_S)
        while True:
            with res.lock:
                spare = self.reserved - res.charged_bytes
                evict = 0 if spare >= need else min(nbytes - spare, res.charged_bytes - floor)
            if evict <= 0:
                break
            freed, busy = self._serve(evict, floor, deadline)
            if freed or not busy or self._asking or time.monotonic() >= retry_until:
                break  # (a thread of this member that is asking holds its room_lock: do not wait for it)
            time.sleep(0.002)  # another thread here is making room: try again, briefly
        with res.lock:
            given = self._release_locked(0)
        self.served += 1
        self.given += given
        return given

    def _tick(self) -> None:
        """Publish this member's usage, drop dead members, give back spare
        reservation beyond one step."""
        try:
            with self._res.lock:
                if self.reserved - self._res.charged_bytes > self.step:
                    self._release_locked(self.step, timeout=0)
                else:  # not waiting for the lock (with the resource lock held): the next tick will do
                    self._transact(lambda state: None, self._usage_locked(), publish=True, timeout=0)
        except LockBusy:
            pass
        except ShareError as e:
            log.warning("share %s: %s", self.name, e)

    def stats(self) -> list[ShareMemberStats]:
        """The live members' rows, this member's usage published first."""
        rows: list[ShareMemberStats] = []

        def collect(state: dict[str, Any]) -> None:
            state["members"][self.id] = self._entry(usage)
            rows.extend(ShareMemberStats.from_entry(k, m) for k, m in state["members"].items())

        with self._res.lock:
            usage = self._usage_locked()
            self._transact(collect, usage, publish=True)
        return rows

    # -- leaving --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop answering requests (peers then skip this member). Idempotent."""
        self._stop.set()
        self._close_socket()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=LOCK_TIMEOUT_S + SERVE_TRY_S + ASK_TIMEOUT_S)

    def leave(self) -> None:
        """Stop serving and drop this member's entry (the caller has released
        its device memory); the last member out deletes the ledger. Idempotent."""
        if self.ledger.closed:
            return
        self.stop()
        try:
            with self.ledger.locked():
                state = self.ledger.load()
                if state is not None:
                    state["members"].pop(self.id, None)
                    _reap(state, self.directory, None)
                    self.ledger.save(state if state["members"] else None)
        except (ShareError, OSError) as e:
            log.warning("share %s: leaving: %s", self.name, e)
        finally:
            self.ledger.close()
        log.info("left share %s", self.name)

    def _close_socket(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None and sock.fileno() >= 0:
            sock.close()
            if os.getpid() == self._pid:  # never a forked child's: the path is its parent's
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)


def _read_line(s: socket.socket, deadline: float) -> bytes:
    """One newline-terminated message (at most 4 KiB) before ``deadline``."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > 4096:
            raise ValueError("no complete message")
        s.settimeout(left)
        chunk = s.recv(4096)
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
    return data
