"""The slot ring both streams use (weights and KV chunks): order, bounded run-ahead, errors."""

from __future__ import annotations

import itertools
import threading

import pytest

from offload_rt.prefetch import Prefetcher


def test_items_arrive_in_order_and_the_reader_stays_within_its_slots():
    filled, lock = [], threading.Lock()
    outstanding = []

    def fill(item, slot):
        with lock:
            filled.append(item)
            outstanding.append(slot)
            assert len(set(outstanding)) == len(outstanding) <= 2  # never two items in one slot
        return item * 10

    ring = Prefetcher(2, fill, itertools.cycle("abc"))
    got = []
    for seq in range(7):
        slot, payload = ring.take(seq)
        got.append(payload)
        with lock:
            outstanding.remove(slot)
        ring.release(slot)
    ring.close()
    assert got == ["a" * 10, "b" * 10, "c" * 10, "a" * 10, "b" * 10, "c" * 10, "a" * 10]
    assert len(filled) <= 7 + 2  # ran ahead by at most its two slots


def test_submitted_items_and_errors_surface_on_the_consumer():
    def fill(item, slot):
        if item == "bad":
            raise OSError("disk gone")
        return item

    ring = Prefetcher(1, fill)
    assert [ring.submit(x) for x in ("x", "y")] == [0, 1]
    slot, x = ring.take(0)
    ring.release(slot)
    assert ring.take(1)[1] == "y"
    ring.release(0)
    ring.submit("bad")
    with pytest.raises(OSError, match="disk gone"):
        ring.take(2)
    ring.close()
