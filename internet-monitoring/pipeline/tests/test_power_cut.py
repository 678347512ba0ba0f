"""Acceptance 3 of issue 12: power cuts, with the unsynced writes really lost.

The queue and the store run in child processes on ``powerfs`` (a FUSE file system that
reverts every file to its last fsync on ``cut``), are SIGKILLed at random moments, the
power is cut, and what was acknowledged is checked (``sim/powercut.py``). With the
shipped ``synchronous=FULL`` nothing may be lost over 50 cuts per side; with ``NORMAL`` the
same check must find loss: proof that it can fail.
"""

from __future__ import annotations

import errno

import pytest

from pipeline.sim.powercut import run_campaign
from pipeline.sim.powerfs import PowerState
from pipeline.tests.disk_support import require_fuse

CUTS = 50


@pytest.fixture
def fuse() -> None:
    require_fuse()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["queue", "store"])
def test_full_sync_survives_power_cuts(fuse: None, side: str, tmp_path) -> None:
    report = run_campaign(side, CUTS, synchronous="FULL", seed=7, workdir=tmp_path)
    assert report.cuts == CUTS
    assert report.acked > CUTS, "the children acknowledged almost nothing: no real test"
    assert report.passed, report.summary() + "\n" + "\n".join(report.examples)


@pytest.mark.parametrize("side", ["queue", "store"])
def test_normal_sync_loses_acknowledged_data_and_the_harness_sees_it(fuse: None, side: str,
                                                                     tmp_path) -> None:
    report = run_campaign(side, 40, synchronous="NORMAL", seed=7, workdir=tmp_path,
                          stop_on_loss=True)
    assert report.lost > 0, ("synchronous=NORMAL lost nothing over "
                             f"{report.cuts} cuts: the harness cannot detect loss")
    assert report.corrupt == 0, report.examples


# -- the file system's power semantics, without FUSE ----------------------------------


def test_cut_reverts_files_to_their_last_fsync_and_names_to_the_last_dir_fsync() -> None:
    fs = PowerState()
    fh = fs.create("db", 0o644)
    node = fs.by_handle(fh, "db")
    fs.write(node, "db", b"hello", 0)
    fs.fsync(node, "db")
    fs.fsync_dir()
    fs.write(node, "db", b"HELLO world", 0)  # not synced: lost
    wal = fs.create("db-wal", 0o644)
    fs.write(fs.by_handle(wal, "db-wal"), "db-wal", b"frames", 0)
    fs.fsync(fs.by_handle(wal, "db-wal"), "db-wal")  # data synced, name never: lost
    fs.unlink("db")  # unlink not made durable by a directory fsync: undone
    lost = fs.cut()
    assert sorted(fs.names) == ["db"]
    assert bytes(fs.node("db").data) == b"hello"
    assert lost["files_reverted"] >= 1


def test_renames_and_truncates_are_durable_only_after_their_syncs() -> None:
    fs = PowerState()
    node = fs.by_handle(fs.create("tmp", 0o644), "tmp")
    fs.write(node, "tmp", b"x" * 100, 0)
    fs.fsync(node, "tmp")
    fs.rename("tmp", "reserve")
    fs.fsync_dir()
    fs.truncate(node, 10)
    fs.cut()
    assert len(fs.node("reserve").data) == 100
    fs.truncate(fs.node("reserve"), 10)
    fs.fsync(fs.node("reserve"), "reserve")
    fs.cut()
    assert len(fs.node("reserve").data) == 10


def test_injected_faults_fail_the_named_operation_once_or_until_cleared() -> None:
    fs = PowerState()
    node = fs.by_handle(fs.create("db-wal", 0o644), "db-wal")
    fs.add_fault("fsync", "EIO", 1, "-wal")
    with pytest.raises(OSError) as once:
        fs.fsync(node, "db-wal")
    assert once.value.errno == errno.EIO
    fs.fsync(node, "db-wal")  # one-off: gone
    fs.add_fault("write", "ENOSPC", None, "")
    for _ in range(3):
        with pytest.raises(OSError) as always:
            fs.write(node, "db-wal", b"x", 0)
        assert always.value.errno == errno.ENOSPC
    fs.command({"cmd": "clear"})
    assert fs.write(node, "db-wal", b"x", 0) == 1
    assert fs.counts["faults_injected"] == 4
