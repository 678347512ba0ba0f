"""How far the dashboard feed has read the ``events`` table, and (PostgreSQL) which rows a
refresh must take so that none committed out of row-id order is missed or taken twice.

SQLite has one writer: row ids become visible in order, and a mark is just the highest row
id read. On PostgreSQL a row id comes from a sequence at insert time, so two servers can
commit them out of order. There every event row also stores the id of the transaction that
inserted it (``events.xid``, ``DEFAULT pg_current_xact_id()``), and a mark also holds the
snapshot (``pg_current_snapshot()``) its highest row id was read in. A transaction commits
all its rows at once, so the rows new between two marks are exactly those whose inserting
transaction is visible in the later snapshot and was not in the earlier one: each committed
row is taken by exactly one refresh, whatever order the row ids committed in. Neither
the order of ``nextval`` calls nor that of transaction ids matters (a transaction with a
lower id may commit later: it is in the earlier snapshot's running list, and taken when a
snapshot sees it finished); only which transactions each snapshot sees as finished does.

The arithmetic on snapshots is here (pure); the reader runs the query.
"""

from __future__ import annotations

from dataclasses import dataclass

# A page of the feed ends at this key: (transaction id, row id) on PostgreSQL, (0, row id)
# in row order (SQLite, and PostgreSQL's first read).
PageKey = tuple[int, int]


@dataclass(frozen=True)
class FeedMark:
    """``row``: the highest row id visible when the mark was taken; ``snapshot``: the
    PostgreSQL snapshot (``xmin:xmax:xip,...``) it was taken in, None on SQLite and for the
    feed's starting mark."""

    row: int
    snapshot: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """A parsed ``pg_snapshot``: transactions below ``xmin`` are finished, those from
    ``xmax`` on had not started, those in ``running`` were in progress."""

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        try:
            xmin, xmax, xip = text.split(":")
            running = frozenset(int(x) for x in xip.split(",") if x)
            return cls(int(xmin), int(xmax), running)
        except ValueError as exc:
            raise ValueError(f"not a pg_snapshot: {text!r}") from exc

    def sees(self, xid: int) -> bool:
        """Whether the work of transaction ``xid`` (if it committed) is visible here."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.running)


def new_xid_range(since: Snapshot, upto: Snapshot) -> tuple[int, int] | None:
    """[low, high) bounding the transactions visible in ``upto`` but not in ``since`` (the
    reader still filters on both snapshots inside it); None when there are none. ``low``
    is the oldest transaction that was running at ``since`` and is finished by ``upto``,
    else ``since.xmax``: a transaction still running holds nothing back."""
    done = [x for x in since.running if upto.sees(x)]
    low = min(done) if done else since.xmax
    high = upto.xmax
    return (low, high) if low < high else None
