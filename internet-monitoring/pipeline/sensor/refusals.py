"""How loudly to report that the server refused this sensor's credentials, sans-I/O.

A refused sensor retries for ever (the operator may fix the server side at any time), so
logging every attempt at WARNING would bury the one line that matters. ``RefusalLog``
says when to log: the first refusal on a channel, whenever the reason changes, and then
once every ``repeat_every_s`` with the number of refusals in between. A success clears
the channel, so the next refusal is reported again at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: What an operator should look at, per HTTP status of the refusal.
HINTS = {
    401: "check token / token_file against the server's auth.sensors entry",
    403: "check sensor_id: the token is valid but not for this sensor",
    1008: "the server closed the control channel (revoked credential or a newer "
          "connection of this sensor id)",
}


@dataclass(frozen=True)
class RefusalNote:
    """A refusal worth a WARNING line; ``repeated`` counts the ones not logged since."""

    channel: str
    status: int
    reason: str
    repeated: int

    @property
    def hint(self) -> str:
        return HINTS.get(self.status, "see the server's log")


@dataclass
class _Seen:
    status: int
    reason: str
    logged_at: float
    suppressed: int = 0


@dataclass
class RefusalLog:
    repeat_every_s: float = 300.0
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def record(self, channel: str, status: int, reason: str, now: float) -> RefusalNote | None:
        """A note to log at WARNING, or None when this refusal repeats a recent one."""
        seen = self._seen.get(channel)
        if (seen is not None and seen.status == status and seen.reason == reason
                and now - seen.logged_at < self.repeat_every_s):
            seen.suppressed += 1
            return None
        repeated = seen.suppressed if seen is not None and seen.reason == reason else 0
        self._seen[channel] = _Seen(status, reason, now)
        return RefusalNote(channel, status, reason, repeated)

    def clear(self, channel: str) -> bool:
        """The channel works again; True if it had been refused."""
        return self._seen.pop(channel, None) is not None
