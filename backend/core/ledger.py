"""The delivery ledger: for each (project, task, model_version), the one prediction Label Studio holds or is getting.

Every path that hands a prediction to Label Studio (the answer to /predict, or a POST through the API)
first claims the task's entry here and records the delivery when done. A claim is a compare-and-set
(one Lua script), so two jobs can never both deliver the same (task, model_version).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

from redis import Redis

from .keys import PREFIX

QUEUED = "queued"
"""A bulk job has been queued for the task (a click may take the task over)."""
DELIVERING = "delivering"
"""A running job is predicting or delivering the task; nobody else may."""
DELIVERED = "delivered"
"""Label Studio holds (or was handed) this prediction."""

VIA_RETURNED = "returned"
"""Delivered as the answer to /predict (Label Studio stored it itself)."""
VIA_POSTED = "posted"
"""Delivered through POST /api/predictions (ls_id is Label Studio's id)."""
VIA_FOUND = "found"
"""Read from Label Studio's stored predictions (made before the ledger knew it)."""

LEDGER_TTL_S = 180 * 24 * 3600
"""A (project, version) ledger untouched this long is dropped."""

# Compare-and-set of several fields of one hash: ARGV holds (field, expected, new) triples; expected ""
# means "absent", new "" means "delete". Returns the fields that were set.
_CAS = """
local won = {}
for i = 1, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if (cur == false and ARGV[i + 1] == '') or cur == ARGV[i + 1] then
    if ARGV[i + 2] == '' then redis.call('HDEL', KEYS[1], ARGV[i]) else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2]) end
    table.insert(won, ARGV[i])
  end
end
if #won > 0 then redis.call('EXPIRE', KEYS[1], %d) end
return won
"""


@dataclass(frozen=True)
class Entry:
    """What the ledger knows of one task's prediction of one model version."""

    state: str
    job: str = ""
    revision: int = 0
    """Support revision the prediction was (or is being) made with; -1 when unknown."""
    via: str = ""
    ls_id: int | None = None
    at: float = 0.0

    def dump(self) -> str:
        """Canonical JSON (compare-and-set compares these strings)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def load(cls, raw: bytes | str) -> Entry:
        """An entry from its stored JSON."""
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Claim:
    """A task a job now owns, with what it replaced."""

    task_id: int
    entry: Entry
    previous: Entry | None


JobAlive = Callable[[str], bool]
"""Whether a job id is still queued, scheduled or running (RQ's view)."""
MayTake = Callable[[int, "Entry | None"], bool]
"""Whether a claimant may take a task (id, current entry)."""


class DeliveryLedger:
    """The ledger of one (project, model_version) in a Redis hash: task id -> Entry."""

    def __init__(self, redis: Redis, pid: int, version: str):
        self.redis = redis
        self.pid = pid
        self.version = version
        self.key = f"{PREFIX}:ledger:{pid}:{version}"
        self._cas = redis.register_script(_CAS % LEDGER_TTL_S)

    def raw(self) -> dict[int, bytes]:
        """Every stored entry as its raw JSON (what compare-and-set expects)."""
        return {int(k): v for k, v in self.redis.hgetall(self.key).items()}

    def entries(self) -> dict[int, Entry]:
        """Every entry, by task id."""
        return {task: Entry.load(raw) for task, raw in self.raw().items()}

    def get(self, task_id: int) -> Entry | None:
        """One task's entry, or None."""
        raw = self.redis.hget(self.key, task_id)
        return Entry.load(raw) if raw else None

    def counts(self) -> dict[str, int]:
        """Entries per state."""
        counts = {QUEUED: 0, DELIVERING: 0, DELIVERED: 0}
        for entry in self.entries().values():
            counts[entry.state] = counts.get(entry.state, 0) + 1
        return counts

    def _swap(self, changes: list[tuple[int, bytes | None, str]]) -> set[int]:
        """Apply (task, expected raw or None for absent, new JSON or "" to delete); returns the tasks that won."""
        won: set[int] = set()
        for start in range(0, len(changes), 500):  # bounded script arguments
            argv: list = []
            for task, expected, new in changes[start : start + 500]:
                argv += [str(task), expected if expected is not None else "", new]
            won |= {int(t) for t in self._cas(keys=[self.key], args=argv)}
        return won

    def claim(self, task_ids: Iterable[int], job: str, revision: int, may_take: MayTake, state: str = DELIVERING,
              tries: int = 3) -> list[Claim]:
        """Claim the tasks whose current entry `may_take` accepts, atomically per task; returns the claims won."""
        wanted = order = list(dict.fromkeys(int(t) for t in task_ids))
        claims: dict[int, Claim] = {}
        for _ in range(tries):  # a lost compare-and-set means someone else wrote: look again
            current = {t: self.redis.hget(self.key, t) for t in wanted} if len(wanted) < 64 else self.raw()
            changes, offered = [], {}
            for task in wanted:
                raw = current.get(task)
                previous = Entry.load(raw) if raw else None
                if not may_take(task, previous):
                    continue
                entry = Entry(state=state, job=job, revision=revision, at=time.time())
                changes.append((task, raw, entry.dump()))
                offered[task] = Claim(task, entry, previous)
            won = self._swap(changes)
            claims.update({t: offered[t] for t in won})
            lost = set(offered) - won
            if not lost:
                break
            wanted = sorted(lost)
        return [claims[t] for t in order if t in claims]  # in the order asked for: tasks are posted in it

    def record(self, claim: Claim, *, via: str, ls_id: int | None = None, revision: int | None = None) -> bool:
        """Mark a claimed task delivered; False (nothing written) if the claim was taken over meanwhile."""
        done = replace(claim.entry, state=DELIVERED, via=via, ls_id=ls_id, at=time.time(),
                       revision=claim.entry.revision if revision is None else revision)
        return bool(self._swap([(claim.task_id, claim.entry.dump().encode(), done.dump())]))

    def release(self, claim: Claim) -> bool:
        """Give a claim back (the job could not deliver): the entry before it returns, if nobody took over."""
        previous = claim.previous
        back = "" if previous is None or previous.job == claim.entry.job else previous.dump()
        return bool(self._swap([(claim.task_id, claim.entry.dump().encode(), back)]))

    def forget(self, task_id: int, entry: Entry) -> bool:
        """Delete a task's entry if it is still `entry` (a delivery Label Studio turned out not to store)."""
        return bool(self._swap([(task_id, entry.dump().encode(), "")]))

    def deleted(self, task_id: int) -> bool:
        """Forget a task's delivered entry whose prediction was deleted from Label Studio (a refresh replaced it with
        another version's), so the counts say what Label Studio holds; an entry being delivered stays."""
        entry = self.get(task_id)
        return entry is not None and entry.state == DELIVERED and self.forget(task_id, entry)

    def seed(self, found: dict[int, int], revision: int) -> int:
        """Record predictions Label Studio already holds (task -> LS id) where the ledger has no entry."""
        changes = [(task, None, Entry(state=DELIVERED, revision=revision, via=VIA_FOUND, ls_id=ls_id,
                                      at=time.time()).dump()) for task, ls_id in found.items()]
        return len(self._swap(changes))


# ---- who may claim what ----------------------------------------------------------------------


def in_flight(entry: Entry | None, alive: JobAlive) -> bool:
    """True if a live job owns the task right now."""
    return entry is not None and entry.state in (QUEUED, DELIVERING) and alive(entry.job)


def bulk_may_take(revision: int, held: dict[int, int] | None, alive: JobAlive) -> MayTake:
    """Bulk pre-labeling takes a task that has no current prediction: missing, stale, duplicated or abandoned.

    `held` maps task id -> how many predictions of the version Label Studio holds (None: not known).
    """

    def may_take(task: int, entry: Entry | None) -> bool:
        if in_flight(entry, alive):
            return False
        count = None if held is None else held.get(task, 0)
        if count is not None and count != 1:
            return True  # none in Label Studio (never made, lost or deleted there), or duplicates to collapse
        if entry is None:
            return count is None  # one in Label Studio the ledger did not know: seeded, not redone
        return entry.state != DELIVERED or entry.revision < revision

    return may_take


def click_may_take(alive: JobAlive) -> MayTake:
    """A click (Label Studio asked, so it holds none) takes any task not being delivered by a live job."""

    def may_take(task: int, entry: Entry | None) -> bool:
        return entry is None or entry.state in (QUEUED, DELIVERED) or not alive(entry.job)

    return may_take


def own_may_take(job: str, revision: int, alive: JobAlive) -> MayTake:
    """A bulk job at work takes its own queued tasks, or tasks left without a current delivery."""

    def may_take(task: int, entry: Entry | None) -> bool:
        if entry is None:
            return True
        if entry.job == job:
            return entry.state != DELIVERED  # delivered by an earlier attempt of this job: done
        if in_flight(entry, alive):
            return False  # taken over by a click or another job
        return entry.state != DELIVERED or entry.revision < revision

    return may_take
