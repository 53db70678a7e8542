"""The support store and its per-label index: policy order, K records per selection, counts, revisions, rebuild."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from backend.core.store import Example, SupportStore

REGION = {"type": "brushlabels", "value": {"brushlabels": ["car"]}}


def example(aid: int, labels: list[str], at: float, truth: bool = False) -> Example:
    return Example(annotation_id=aid, task_id=100 + aid, image_url=f"/data/{aid}.png", regions=[{**REGION, "n": aid}],
                   labels=labels, ground_truth=truth, updated_at=at)


@pytest.fixture
def store(redis, tmp_path) -> SupportStore:
    store = SupportStore(redis, tmp_path)
    store.register_project(1, "<View/>")
    return store


@pytest.mark.parametrize("policy, expected", [
    ("ground_truth_first", [4, 2, 6, 5]),  # ground truth newest first, then the newest others
    ("newest", [6, 5, 4, 3]),
    ("oldest", [1, 2, 3, 4]),
])
def test_policies_order_the_examples(store, policy, expected):
    """Each SUPPORT_POLICY picks its K in the documented order; equal times order by annotation id."""
    for aid, at, truth in [(1, 10, False), (2, 20, True), (3, 30, False), (4, 30, True), (5, 50, False), (6, 50, False)]:
        store.upsert(1, example(aid, ["car"], at, truth))
    assert [e.annotation_id for e in store.select(1, "car", 4, policy)] == expected


def test_selection_reads_only_k_records(store, redis, monkeypatch):
    """Selecting K of 300 examples reads K records, not the whole hash."""
    for aid in range(300):
        store.upsert(1, example(aid, ["car"], float(aid)))
    calls = []
    monkeypatch.setattr(redis, "hvals", lambda *a: calls.append(("hvals", a)) or [])
    original = redis.hmget
    monkeypatch.setattr(redis, "hmget", lambda key, ids: calls.append(("hmget", len(ids))) or original(key, ids))
    chosen = store.select(1, "car", 5, "newest")
    assert [e.annotation_id for e in chosen] == [299, 298, 297, 296, 295]
    assert calls == [("hmget", 5)]


def test_counts_and_revisions_follow_each_label(store):
    """Counts come from the index; a change to one label's examples bumps that label's revision only."""
    store.upsert(1, example(1, ["car"], 1))
    store.upsert(1, example(2, ["car", "sky"], 2))
    before = store.label_revisions(1)
    assert store.label_counts(1) == {"car": 2, "sky": 1}
    store.upsert(1, example(3, ["sky"], 3))
    after = store.label_revisions(1)
    assert after["car"] == before["car"] and after["sky"] == before["sky"] + 1
    store.upsert(1, example(2, ["car"], 4))  # annotation 2 no longer labels sky
    assert store.label_counts(1) == {"car": 2, "sky": 1}
    assert [e.annotation_id for e in store.select(1, "sky", 5, "newest")] == [3]
    assert store.remove(1, [1, 2, 3]) == 3
    assert store.label_counts(1) == {}
    assert store.select(1, "car", 5, "newest") == []


def test_unchanged_example_changes_nothing(store):
    """Storing the same content again is no new revision of the project or of the label."""
    assert store.upsert(1, example(1, ["car"], 1))
    revisions, revision = store.label_revisions(1), store.revision(1)
    assert not store.upsert(1, example(1, ["car"], 1))
    assert store.label_revisions(1) == revisions and store.revision(1) == revision


def test_examples_stored_before_the_index_are_indexed_on_first_use(store, redis):
    """Data written by a version without the index (examples hash only) is indexed once, then kept up to date."""
    for aid in range(4):
        redis.hset("dws:examples:1", str(aid), json.dumps(asdict(example(aid, ["car"], float(aid), truth=aid == 0))))
    assert store.label_counts(1) == {"car": 4}
    assert [e.annotation_id for e in store.select(1, "car", 2, "ground_truth_first")] == [0, 3]
    store.upsert(1, example(9, ["car"], 99.0))
    assert [e.annotation_id for e in store.select(1, "car", 1, "newest")] == [9]


def test_unknown_project_stays_unknown(store):
    """Reading counts or selecting for a project never seen creates no project record."""
    assert store.label_counts(42) == {} and store.select(42, "car", 3, "newest") == []
    assert store.project(42) is None


def test_a_field_written_after_redis_lost_the_project_does_not_bring_it_back(store, redis):
    """A job finishing after Redis was emptied writes its field; the project stays unknown until /setup or a
    webhook registers its config again (it was answered 200 with no config, and the backfill never ran)."""
    redis.flushall()
    store.set_project_field(1, "review_view", "v1:3")
    store.incr_project_field(1, "new_since_train", 1)
    assert store.project(1) is None and 1 not in store.projects()
    store.register_project(1, "<View/>")
    assert store.project(1)["review_view"] == "v1:3"


def test_a_deletion_reads_only_its_own_records(store, redis, monkeypatch):
    """Removing examples reads no other example (the image sets say whether a cached image is still used): the
    image shared by two annotations of one task stays until the second goes."""
    shared = [Example(annotation_id=aid, task_id=500, image_url="/data/shared.png", regions=[{**REGION, "n": aid}],
                      labels=["car"], updated_at=float(aid)) for aid in (1, 2)]
    for e in [*shared, *(example(aid, ["car"], float(aid)) for aid in range(3, 50))]:
        store.upsert(1, e)
    image = store.image_path(1, 500, "/data/shared.png")
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"png")
    monkeypatch.setattr(SupportStore, "examples", lambda *a: pytest.fail("a deletion read every example"))
    assert store.remove(1, [1]) == 1 and image.exists()
    assert store.remove(1, [2, 3, 4]) == 3 and not image.exists()
    assert store.label_counts(1) == {"car": 45}


def test_an_index_built_before_the_image_sets_is_built_again(store, redis):
    """Projects indexed by the earlier layout (no image sets) are indexed again on first use."""
    store.upsert(1, example(1, ["car"], 1.0))
    redis.delete(store.index.built_key(1), store.index.image_key(1, example(1, ["car"], 1.0).image_id))
    redis.set("dws:support-indexed:1", 1)  # the earlier layout's marker
    assert store.label_counts(1) == {"car": 1}
    store.ensure_index(1)
    assert redis.smembers(store.index.image_key(1, example(1, ["car"], 1.0).image_id)) == {b"000000000000001"}


def test_held_examples_leave_the_index_and_come_back_when_confirmed(store, redis):
    """A held example stays stored but is selected by no policy, also after the index is rebuilt; confirming puts it
    back (a new label revision) and it is never held again unless edited; removing it forgets both marks."""
    for aid in range(1, 4):
        store.upsert(1, example(aid, ["car"], float(aid)))
    revisions = store.label_revisions(1)["car"]
    assert store.hold(1, [2, 2, 77]) == [2] and store.hold(1, [2]) == []  # unknown and already held: nothing
    assert store.label_revisions(1)["car"] > revisions and store.label_counts(1) == {"car": 2}
    assert [e.annotation_id for e in store.select(1, "car", 5, "oldest")] == [1, 3]
    redis.delete(store.index.built_key(1))  # a rebuild (data older than the index) keeps it out too
    assert store.label_counts(1) == {"car": 2} and store.held(1) == {2}
    assert store.confirm(1, 2) and store.held(1) == set() and store.label_counts(1) == {"car": 3}
    assert store.hold(1, [2]) == [] and not store.confirm(1, 77)
    store.upsert(1, example(2, ["car", "bus"], 5.0))  # edited: a later check may hold it again
    assert store.confirmed(1) == set() and store.hold(1, [2]) == [2]
    store.remove(1, [2])
    assert store.held(1) == set() and store.label_counts(1) == {"car": 2}
