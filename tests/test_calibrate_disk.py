"""Issue 21, item 2: the first-run disk probe on a disk with little free space.

The probe wrote 512 MiB whatever the free space; on a small offload dir every first run ended in an
``OSError: [Errno 28]`` traceback though the store fitted. It is now sized to the free space, skipped
(with a note, and an assumed figure) when too little is free or when the filesystem refuses it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections import namedtuple

import pytest

from offload_rt.memory import calibrate, disk_probe
from offload_rt.memory.plan import Bandwidths

MiB = 1 << 20
GiB = 1 << 30
Usage = namedtuple("Usage", "total used free")


def _fake_free(monkeypatch, free: int) -> None:
    """``shutil.disk_usage`` (statvfs) reports ``free`` bytes free, whatever the disk holds."""
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(free * 2, free, free))


def _fake_compute(monkeypatch) -> None:
    """Every compute figure answers at once (no machine measured); the machine counts as quiet."""
    monkeypatch.setattr(calibrate, "measure_mem_read", lambda n: 2e10)
    monkeypatch.setattr(calibrate, "measure_layer_costs", lambda d: (2e10, 1e-4))
    monkeypatch.setattr(calibrate, "measure_token_overhead", lambda d, device: 1e-4)
    monkeypatch.setattr(calibrate, "others_cpu", lambda a, b: 0.0)


def _entry(tmp_path) -> dict:
    cache = json.loads((tmp_path / "cache" / calibrate.CACHE_FILE).read_text())
    return cache["entries"][calibrate.cache_key(tmp_path)]


def test_probe_size_follows_the_free_space():
    assert disk_probe.probe_size(None) == calibrate.DISK_TEST_BYTES  # unknown: the probe's own errors decide
    assert disk_probe.probe_size(100 * GiB) == calibrate.DISK_TEST_BYTES
    # a quarter of what is free, in PROBE_FILES whole MiB files
    assert disk_probe.probe_size(200 * MiB) == 48 * MiB
    assert disk_probe.probe_size(200 * MiB) <= 200 * MiB * disk_probe.DISK_PROBE_FREE_FRACTION
    # a 150 MB disk holding the default model's store: too little for a meaningful probe
    assert disk_probe.probe_size(60 * MiB) == 0
    assert disk_probe.probe_size(0) == 0


def test_a_full_disk_skips_the_probe_and_says_so(monkeypatch, tmp_path):
    _fake_free(monkeypatch, 60 * MiB)
    _fake_compute(monkeypatch)
    monkeypatch.setattr(calibrate, "measure_disk_read",
                        lambda d, n: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    notes, report = [], {}
    bw = calibrate.measure_bandwidths(tmp_path, progress=False, report=report, notify=notes.append)
    assert bw.disk_read == calibrate.DEFAULT_DISK_READ and bw.matvec == 2e10
    assert len(notes) == 1 and "\n" not in notes[0] and "not measured" in notes[0] and str(tmp_path) in notes[0]
    assert report["disk_probe_bytes"] == 0
    assert list(tmp_path.iterdir()) == []


def test_a_probe_the_filesystem_refuses_is_skipped_not_raised(monkeypatch, tmp_path):
    """statvfs may promise room a quota (or a race) does not give: the write's own error skips the probe."""
    _fake_free(monkeypatch, 100 * GiB)
    for err in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        def refuse(d, n, err=err):
            raise OSError(err, os.strerror(err))

        probe = disk_probe.probe_disk(tmp_path, measure=refuse)
        assert probe.skipped and probe.bytes_per_s == disk_probe.DEFAULT_DISK_READ
        assert os.strerror(err) in probe.note


def test_a_small_disk_gets_a_smaller_probe(monkeypatch, tmp_path):
    _fake_free(monkeypatch, 200 * MiB)
    sizes = []
    probe = disk_probe.probe_disk(tmp_path, measure=lambda d, n: sizes.append(n) or 1.5e9)
    assert sizes == [48 * MiB] and probe.bytes_per_s == 1.5e9 and not probe.skipped
    assert "48.00 MiB probe" in probe.note  # said, with the size it used


def test_a_skipped_probe_runs_once_the_disk_has_room(monkeypatch, tmp_path):
    """The entry of a skipped probe keeps its compute figures; the disk alone is probed on a later run
    that finds room, and not while there is none (one statvfs)."""
    monkeypatch.delenv(calibrate.ENV_OVERRIDE, raising=False)
    monkeypatch.setenv("OFFLOAD_RT_CACHE", str(tmp_path / "cache"))
    _fake_compute(monkeypatch)
    _fake_free(monkeypatch, 60 * MiB)
    probed = []
    monkeypatch.setattr(calibrate, "measure_disk_read", lambda d, n: probed.append(n) or 1.8e9)
    first = calibrate.load_or_measure(tmp_path, progress=False)
    assert first.disk_read == calibrate.DEFAULT_DISK_READ and probed == []
    assert calibrate.load_or_measure(tmp_path, progress=False).disk_read == calibrate.DEFAULT_DISK_READ
    assert probed == []
    _fake_free(monkeypatch, 100 * GiB)
    monkeypatch.setattr(calibrate, "measure_layer_costs", lambda d: pytest.fail("compute measured again"))
    later = calibrate.load_or_measure(tmp_path, progress=False)
    assert later.disk_read == 1.8e9 and later.matvec == first.matvec and probed == [calibrate.DISK_TEST_BYTES]
    entry = _entry(tmp_path)
    assert entry["disk_read"] == 1.8e9 and entry["disk_probe_bytes"] == calibrate.DISK_TEST_BYTES
    assert calibrate.load_or_measure(tmp_path, progress=False).disk_read == 1.8e9 and len(probed) == 1


def test_probe_on_a_small_tmpfs(monkeypatch, tmp_path):
    """A real 40 MiB filesystem: skipped for its free space; and when statvfs is made to lie, the real
    ENOSPC of the write skips it, with every probe file gone."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        probe = disk_probe.probe_disk(mnt, measure=lambda d, n: pytest.fail("probed a 40 MiB disk"))
        assert probe.skipped and "not measured" in probe.note
        _fake_free(monkeypatch, 100 * GiB)
        probe = disk_probe.probe_disk(mnt)
        assert probe.skipped and os.strerror(errno.ENOSPC) in probe.note
        assert list(mnt.iterdir()) == []
        monkeypatch.undo()
        assert shutil.disk_usage(mnt).free > 39 * MiB  # nothing left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_measured_entry_records_the_probe(monkeypatch, tmp_path):
    monkeypatch.delenv(calibrate.ENV_OVERRIDE, raising=False)
    monkeypatch.setenv("OFFLOAD_RT_CACHE", str(tmp_path / "cache"))
    _fake_compute(monkeypatch)
    _fake_free(monkeypatch, 100 * GiB)
    monkeypatch.setattr(calibrate, "measure_disk_read", lambda d, n: 2e9)
    bw = calibrate.load_or_measure(tmp_path, progress=False)
    assert isinstance(bw, Bandwidths) and bw.disk_read == 2e9
    entry = _entry(tmp_path)
    assert entry["disk_probe_bytes"] == calibrate.DISK_TEST_BYTES and entry["disk_note"] == ""
