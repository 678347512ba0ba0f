"""Which replica owns a sensor's session, sans-I/O.

Exactly one replica owns a sensor's session: it holds a session-level PostgreSQL advisory
lock keyed by the sensor id, on a dedicated connection. PostgreSQL releases the lock when
that connection ends, so a SIGKILLed replica's sessions free themselves as soon as the
kernel closes its sockets. Only the owner issues windows, and it issues them only after
loading the sensor's windows, epoch and offsets from the store (which the previous owner
wrote before it sent any request: invariant 6), with its own tag in every new window id:
no window id is ever issued twice with different contents.

Per sensor, on one replica::

    state      input                       -> state      actions
    ---------  --------------------------  ---------  ------------------------------------
    NONE       control socket connects     WAITING    TryLock
    WAITING    lock taken                  LOADING    LoadSession
    WAITING    lock busy, claim < timeout  WAITING    AskRelease (first try), retry later
    WAITING    lock busy, claim timed out  NONE       Refuse (socket closed: try later)
    WAITING    tick at the retry time      WAITING    TryLock
    LOADING    session loaded              OWNED      Resume (with acks deferred meanwhile)
    OWNED      socket disconnects          RELEASING  Persist
    OWNED      another replica asks        OWNED      CloseSocket (then: disconnects)
    RELEASING  persisted                   NONE       Unlock
    RELEASING  socket connects again       OWNED      Resume (lock still held)
    WAITING    socket disconnects          NONE       -
    any        lock connection lost        NONE       CloseSocket for each held session
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any


class ClaimState(str, enum.Enum):
    NONE = "none"
    WAITING = "waiting"
    LOADING = "loading"
    OWNED = "owned"
    RELEASING = "releasing"


LockKey = tuple[int, int]


def lock_key(sensor_id: str, namespace: str = "") -> LockKey:
    """The advisory-lock key of a sensor's session: two signed int4 halves of its 64-bit
    BLAKE2b hash. The two-key form is its own key space in PostgreSQL, apart from the
    bigint keys the store's transactions lock sensors with (a session lock sharing a key
    with those would block ingest). Two sensors sharing a key would share ownership (one
    replica owns both or waits): with 100,000 sensors the chance is about 3e-10.
    ``namespace`` (the store's schema) keeps clusters sharing one database apart."""
    digest = hashlib.blake2b(f"{namespace}\0{sensor_id}".encode(), digest_size=8,
                             person=b"uxi-session").digest()
    return (int.from_bytes(digest[:4], "big", signed=True),
            int.from_bytes(digest[4:], "big", signed=True))


@dataclass(frozen=True)
class TryLock:
    sensor_id: str
    key: LockKey


@dataclass(frozen=True)
class AskRelease:
    sensor_id: str


@dataclass(frozen=True)
class LoadSession:
    sensor_id: str


@dataclass(frozen=True)
class Resume:
    sensor_id: str
    deferred: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Refuse:
    sensor_id: str


@dataclass(frozen=True)
class CloseSocket:
    sensor_id: str
    reason: str


@dataclass(frozen=True)
class Persist:
    sensor_id: str


@dataclass(frozen=True)
class Unlock:
    sensor_id: str
    key: LockKey


OwnershipAction = (TryLock | AskRelease | LoadSession | Resume | Refuse | CloseSocket
                   | Persist | Unlock)


@dataclass
class _Claim:
    state: ClaimState = ClaimState.NONE
    started: float = 0.0
    next_try: float = 0.0
    asked: bool = False
    deferred: list[Any] = field(default_factory=list)


class OwnershipTable:
    """Session ownership of one replica; the shell runs the actions it returns and
    reports their results back (``on_lock_result``, ``on_loaded``, ``on_persisted``)."""

    def __init__(self, *, retry_s: float = 0.2, claim_timeout_s: float = 5.0,
                 max_deferred: int = 10_000, namespace: str = "") -> None:
        self.namespace = namespace
        self.retry_s = retry_s
        self.claim_timeout_s = claim_timeout_s
        self.max_deferred = max_deferred
        self._claims: dict[str, _Claim] = {}
        self.refused = 0
        self.released_on_request = 0

    def state(self, sensor_id: str) -> ClaimState:
        claim = self._claims.get(sensor_id)
        return claim.state if claim is not None else ClaimState.NONE

    def owned(self) -> list[str]:
        return [s for s, c in self._claims.items() if c.state is ClaimState.OWNED]

    def on_connect(self, sensor_id: str, now: float) -> list[OwnershipAction]:
        claim = self._claims.setdefault(sensor_id, _Claim())
        if claim.state is ClaimState.NONE:
            claim.state, claim.started, claim.next_try = ClaimState.WAITING, now, now
            claim.asked = False
            return [TryLock(sensor_id, self._key(sensor_id))]
        if claim.state is ClaimState.RELEASING:
            claim.state = ClaimState.OWNED
            return [Resume(sensor_id)]
        if claim.state is ClaimState.OWNED:
            return [Resume(sensor_id)]  # a second socket here: the manager replaces
        return []  # WAITING or LOADING: the claim under way serves this socket too

    def on_lock_result(self, sensor_id: str, acquired: bool,
                       now: float) -> list[OwnershipAction]:
        claim = self._claims.get(sensor_id)
        if claim is None or claim.state is not ClaimState.WAITING:
            # Disconnected while the lock was being taken: give it back at once.
            return [Unlock(sensor_id, self._key(sensor_id))] if acquired else []
        if acquired:
            claim.state = ClaimState.LOADING
            return [LoadSession(sensor_id)]
        if now - claim.started >= self.claim_timeout_s:
            self._forget(sensor_id)
            self.refused += 1
            return [Refuse(sensor_id)]
        claim.next_try = now + self.retry_s
        if claim.asked:
            return []
        claim.asked = True
        return [AskRelease(sensor_id)]

    def on_tick(self, now: float) -> list[OwnershipAction]:
        out: list[OwnershipAction] = []
        for sensor_id, claim in self._claims.items():
            if claim.state is ClaimState.WAITING and claim.next_try <= now:
                claim.next_try = now + 3600.0  # until its result comes back
                out.append(TryLock(sensor_id, self._key(sensor_id)))
        return out

    def defer(self, sensor_id: str, item: Any) -> bool:
        """Hold ``item`` until the session is loaded; False when there is no such claim
        or the buffer is full (the item is dropped: the sensor re-sends, see routing)."""
        claim = self._claims.get(sensor_id)
        if claim is None or claim.state is not ClaimState.LOADING \
                or len(claim.deferred) >= self.max_deferred:
            return False
        claim.deferred.append(item)
        return True

    def on_loaded(self, sensor_id: str) -> list[OwnershipAction]:
        claim = self._claims.get(sensor_id)
        if claim is None or claim.state is not ClaimState.LOADING:
            return []
        claim.state = ClaimState.OWNED
        deferred, claim.deferred = tuple(claim.deferred), []
        return [Resume(sensor_id, deferred)]

    def on_disconnect(self, sensor_id: str) -> list[OwnershipAction]:
        claim = self._claims.get(sensor_id)
        if claim is None:
            return []
        if claim.state is ClaimState.OWNED:
            claim.state = ClaimState.RELEASING
            return [Persist(sensor_id)]
        if claim.state is ClaimState.LOADING:
            # The loaded session must still be persisted and unlocked.
            claim.state = ClaimState.RELEASING
            claim.deferred = []
            return [Persist(sensor_id)]
        if claim.state is ClaimState.WAITING:
            self._forget(sensor_id)  # a lock result still coming is answered with Unlock
        return []

    def on_persisted(self, sensor_id: str) -> list[OwnershipAction]:
        claim = self._claims.get(sensor_id)
        if claim is None or claim.state is not ClaimState.RELEASING:
            return []  # connected again meanwhile: still ours
        self._forget(sensor_id)
        return [Unlock(sensor_id, self._key(sensor_id))]

    def on_release_request(self, sensor_id: str) -> list[OwnershipAction]:
        if self.state(sensor_id) is not ClaimState.OWNED:
            return []
        self.released_on_request += 1
        return [CloseSocket(sensor_id, "replaced")]

    def on_locks_lost(self) -> list[OwnershipAction]:
        """The lock connection died: PostgreSQL let go of every lock we held."""
        out: list[OwnershipAction] = [
            CloseSocket(sensor_id, "session lock lost")
            for sensor_id, claim in self._claims.items()
            if claim.state in (ClaimState.OWNED, ClaimState.LOADING, ClaimState.RELEASING)]
        self._claims.clear()
        return out

    def _key(self, sensor_id: str) -> LockKey:
        return lock_key(sensor_id, self.namespace)

    def _forget(self, sensor_id: str) -> None:
        self._claims.pop(sensor_id, None)
