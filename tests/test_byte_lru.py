"""memetrace.byte_lru.ByteLRU: bounded by bytes, least recently used out first."""

from __future__ import annotations

from memetrace.byte_lru import ENTRY_BYTES, ByteLRU


def _lru(max_values: int) -> ByteLRU[str, bytes]:
    """A cache holding ``max_values`` bytes of values (each entry's own keeping added to the budget)."""
    return ByteLRU(max_values, len)


def test_values_are_evicted_by_their_bytes_not_their_count() -> None:
    lru = _lru(1000 + 3 * ENTRY_BYTES)
    lru.put("big", b"x" * 900)
    lru.put("a", b"x" * 50)
    lru.put("b", b"x" * 50)
    assert len(lru) == 3 and lru.nbytes == 1000 + 3 * ENTRY_BYTES
    lru.put("c", b"x" * 1)  # one byte over: the oldest goes, the big one
    assert lru.get("big") == (False, None)
    assert [lru.get(k)[0] for k in "abc"] == [True, True, True]
    assert lru.nbytes == 101 + 3 * ENTRY_BYTES


def test_a_hit_makes_an_entry_the_most_recent() -> None:
    lru = _lru(300 + 3 * ENTRY_BYTES)
    for k in "abc":
        lru.put(k, b"x" * 100)
    assert lru.get("a") == (True, b"x" * 100)
    lru.put("d", b"x" * 100)  # b is now the least recently used
    assert [k for k in "abcd" if lru.get(k)[0]] == ["a", "c", "d"]


def test_a_value_larger_than_the_budget_is_not_kept_and_evicts_nothing() -> None:
    lru = _lru(100 + ENTRY_BYTES)
    lru.put("small", b"x" * 10)
    lru.put("huge", b"x" * 101)
    assert lru.get("huge") == (False, None) and lru.get("small") == (True, b"x" * 10)
    assert lru.nbytes == 10 + ENTRY_BYTES


def test_putting_a_key_again_replaces_its_bytes() -> None:
    lru = _lru(1000)
    lru.put("a", b"x" * 500)
    lru.put("a", b"x" * 10)
    assert len(lru) == 1 and lru.nbytes == 10 + ENTRY_BYTES


def test_a_cached_none_is_told_from_a_miss_and_still_counted() -> None:
    lru: ByteLRU[int, bytes | None] = ByteLRU(2 * ENTRY_BYTES, lambda v: 0 if v is None else len(v))
    for k in range(5):
        lru.put(k, None)  # empty values are bounded too: their entries cost ENTRY_BYTES
    assert len(lru) == 2 and lru.get(4) == (True, None) and lru.get(0) == (False, None)


def test_a_zero_budget_keeps_nothing() -> None:
    lru = _lru(0)
    lru.put("a", b"")
    assert len(lru) == 0 and lru.nbytes == 0
