"""The delivery ledger on a real Redis: atomic claims, and who may take a task from whom."""

from __future__ import annotations

import threading

from backend.core.ledger import (
    DELIVERED,
    DELIVERING,
    QUEUED,
    VIA_POSTED,
    VIA_RETURNED,
    DeliveryLedger,
    Entry,
    bulk_may_take,
    click_may_take,
    own_may_take,
)


def _anyone(task, entry):
    return entry is None


def test_claim_is_exclusive_under_concurrency(redis):
    """Eight threads claim the same 50 tasks at once: each task is won by exactly one of them."""
    ledger = DeliveryLedger(redis, 1, "v1")
    won: dict[str, list[int]] = {}
    barrier = threading.Barrier(8)

    def claimant(name: str) -> None:
        barrier.wait()
        won[name] = [c.task_id for c in DeliveryLedger(redis, 1, "v1").claim(range(50), name, 3, _anyone)]

    threads = [threading.Thread(target=claimant, args=(f"job{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(t for tasks in won.values() for t in tasks)
    assert every == list(range(50))
    assert {task: e.job for task, e in ledger.entries().items()} == {t: n for n, ts in won.items() for t in ts}


def test_record_release_and_take_over(redis):
    """A claim becomes a delivery; a released claim restores what was there; a stale claim cannot record."""
    ledger = DeliveryLedger(redis, 1, "v1")
    [claim] = ledger.claim([7], "a", 2, _anyone)
    assert ledger.get(7).state == DELIVERING and ledger.get(7).job == "a"
    assert ledger.record(claim, via=VIA_POSTED, ls_id=99, revision=3)
    done = ledger.get(7)
    assert (done.state, done.via, done.ls_id, done.revision) == (DELIVERED, VIA_POSTED, 99, 3)
    # a refresh at revision 4 claims over the delivery, fails, and gives the old delivery back
    [again] = ledger.claim([7], "b", 4, lambda t, e: e is not None and e.revision < 4)
    assert again.previous == done
    assert ledger.release(again) and ledger.get(7) == done
    # a claim that was taken over meanwhile cannot record: the new owner's entry stays
    [first] = ledger.claim([8], "c", 1, _anyone)
    ledger.claim([8], "d", 1, lambda t, e: e.job == "c")
    assert not ledger.record(first, via=VIA_RETURNED) and not ledger.release(first)
    assert ledger.get(8).job == "d"
    assert ledger.counts() == {QUEUED: 0, DELIVERING: 1, DELIVERED: 1}


def test_seed_keeps_existing_entries(redis):
    """Predictions found in Label Studio are recorded only where the ledger has nothing."""
    ledger = DeliveryLedger(redis, 1, "v1")
    ledger.claim([1], "a", 1, _anyone)
    assert ledger.seed({1: 10, 2: 20}, revision=5) == 1
    assert ledger.get(1).job == "a"
    assert (ledger.get(2).state, ledger.get(2).ls_id, ledger.get(2).revision) == (DELIVERED, 20, 5)


def test_bulk_policy():
    """Bulk takes missing, stale, duplicated and abandoned tasks; never one in flight or current."""
    alive = {"live"}.__contains__
    current = Entry(DELIVERED, job="x", revision=5, via=VIA_POSTED, ls_id=1)
    stale = Entry(DELIVERED, job="x", revision=4, via=VIA_POSTED, ls_id=1)
    flying = Entry(QUEUED, job="live", revision=5)
    dead = Entry(DELIVERING, job="gone", revision=5)
    unknown_ls = bulk_may_take(5, None, alive)
    assert unknown_ls(1, None) and unknown_ls(1, stale) and unknown_ls(1, dead)
    assert not unknown_ls(1, current) and not unknown_ls(1, flying)
    seen = bulk_may_take(5, {1: 0, 2: 1, 3: 2}, alive)
    assert seen(1, current)  # the ledger says delivered, Label Studio has none: deliver again
    assert not seen(2, None)  # one in Label Studio the ledger did not know: recorded (seeded), not redone
    assert seen(3, current)  # two in Label Studio: collapse into one
    assert not seen(3, flying)


def test_click_and_own_policies():
    """A click takes queued and delivered tasks (Label Studio asked for them), a bulk job only its own or free ones."""
    alive = {"live", "me"}.__contains__
    click = click_may_take(alive)
    assert click(1, None) and click(1, Entry(QUEUED, job="live")) and click(1, Entry(DELIVERED, job="x"))
    assert not click(1, Entry(DELIVERING, job="live")) and click(1, Entry(DELIVERING, job="gone"))
    own = own_may_take("me", 5, alive)
    assert own(1, Entry(QUEUED, job="me")) and own(1, Entry(DELIVERING, job="me"))  # retried after a crash
    assert not own(1, Entry(DELIVERED, job="me", revision=5))
    assert not own(1, Entry(DELIVERING, job="live")) and not own(1, Entry(DELIVERED, job="click", revision=5))
    assert own(1, Entry(DELIVERED, job="click", revision=4)) and own(1, Entry(QUEUED, job="gone")) and own(1, None)
