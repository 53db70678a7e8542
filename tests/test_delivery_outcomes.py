"""backend.worker.delivery: each task ends with one typed outcome, and its claim ends recorded or released."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from backend.core.context import ProjectContext
from backend.core.ledger import DELIVERED, DeliveryLedger
from backend.worker.delivery import Delivered, Delivery
from backend.worker.ls_client import LabelStudioRefused, LabelStudioUnavailable
from backend.worker.segmenter import PredictionRun, TaskFailure

from bench.synthetic import CONFIG_XML

VERSION = "v-test"


class FakeAPI:
    """Label Studio's answers per task: a stored prediction id, or an error to raise."""

    def __init__(self, answers: dict):
        self.answers, self.asked = answers, []

    def replace_prediction(self, task_id, prediction, project_id, drop_other_versions):
        self.asked.append(task_id)
        answer = self.answers[task_id]
        if isinstance(answer, Exception):
            raise answer
        return answer, set()


def _delivery(redis, settings, api, run=None, error=None) -> Delivery:
    class Segmenter:
        def predict(self, project, tasks, config):
            if error is not None:
                raise error
            return run

    ctx = SimpleNamespace(redis=redis, settings=settings, api_or_none=lambda project: api,
                          segmenter=lambda project: Segmenter())
    project = ProjectContext(project=1, label_config=CONFIG_XML, model_version=VERSION, revision=3)
    return Delivery(ctx, project, "job-1")


def _claims(delivery: Delivery, ids: list[int]) -> dict:
    return delivery.claim(ids, lambda task_id, entry: entry is None)


def test_posts_refusals_and_an_outage_end_typed(redis, settings):
    """Posted (recorded), refused (FAILED with Label Studio's status, released), then unreachable: that task and
    every later one NOT_POSTED (retryable, released, never tried)."""
    api = FakeAPI({1: 101, 2: LabelStudioRefused("bad result", 400), 3: LabelStudioUnavailable("down"), 4: 104})
    delivery = _delivery(redis, settings, api)
    claims = _claims(delivery, [1, 2, 3, 4])
    ended = delivery.post(claims, {t: {"result": []} for t in claims}, revision=3)
    assert [(o.task_id, o.delivered) for o in ended] == [
        (1, Delivered.POSTED), (2, Delivered.FAILED), (3, Delivered.NOT_POSTED), (4, Delivered.NOT_POSTED)]
    assert api.asked == [1, 2, 3]
    refused, down = ended[1], ended[2]
    assert (refused.kind, refused.status, refused.retryable) == ("LabelStudioRefused", 400, False)
    assert refused.reason() == "Label Studio refused it: bad result"
    assert down.retryable and down.reason() == "not posted yet: down" and down.status == 503
    entries = DeliveryLedger(redis, 1, VERSION).entries()
    assert set(entries) == {1} and entries[1].state == DELIVERED and entries[1].ls_id == 101
    assert delivery.reasons(Delivered.FAILED, Delivered.NOT_POSTED) == {
        2: "Label Studio refused it: bad result", 3: "not posted yet: down", 4: "not posted yet: down"}


def test_no_api_access_releases_every_claim_not_posted(redis, settings):
    delivery = _delivery(redis, settings, None)
    claims = _claims(delivery, [5, 6])
    ended = delivery.post(claims, {5: {}, 6: {}}, revision=3)
    assert all(o.retryable and "no Label Studio API access" in o.message for o in ended)
    assert DeliveryLedger(redis, 1, VERSION).entries() == {}


def test_model_failures_release_their_claims(redis, settings):
    """A task the model fails ends FAILED with its message; a model that raises releases every claim."""
    run = PredictionRun(predictions={7: {"result": []}}, failures=[TaskFailure(8, "image not found")], revision=3)
    delivery = _delivery(redis, settings, FakeAPI({}), run=run)
    claims = _claims(delivery, [7, 8])
    assert delivery.predict(claims, [{"id": 7}, {"id": 8}]) is run and set(claims) == {7}
    assert delivery.outcomes[8].delivered is Delivered.FAILED and delivery.reasons(Delivered.FAILED) == {8: "image not found"}
    delivery.record_returned(claims, 3)
    assert delivery.count(Delivered.RETURNED) == 1 and set(DeliveryLedger(redis, 1, VERSION).entries()) == {7}

    broken = _delivery(redis, settings, FakeAPI({}), error=RuntimeError("out of memory"))
    claims = _claims(broken, [9, 10])
    with pytest.raises(RuntimeError, match="out of memory"):
        broken.predict(claims, [{"id": 9}, {"id": 10}])
    assert set(DeliveryLedger(redis, 1, VERSION).entries()) == {7}  # 9 and 10 released: a later job takes them
