"""Hostile input, generated: the RLE decoder and the request bodies never fail in an unplanned way."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from backend.core.rle import RLEError, decode, mask_to_rle, rle_to_mask

from bench.synthetic import CONFIG_XML, annotation_event, square_scene

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.lists(st.integers(0, 255), max_size=300))
def test_decoder_raises_only_rle_errors_and_stays_small(rle):
    """Any byte list: a decoded array or RLEError, never another exception, never a large allocation."""
    tracemalloc.start()
    try:
        values = decode(rle)
    except RLEError:
        values = None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 << 20, f"decoding {len(rle)} bytes allocated {peak} bytes"
    if values is not None:
        assert values.dtype == np.uint8


@FUZZ
@given(st.binary(min_size=4, max_size=4), st.lists(st.integers(0, 255), min_size=3, max_size=60))
def test_any_header_claim_is_bounded_by_the_body(header, body):
    """A header claiming up to 2**32 values with a short body is refused without allocating it."""
    tracemalloc.start()
    try:
        decode(list(header) + [7 << 3 | 1, 0b10011011, 0b11111100] + body)
    except RLEError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 << 20


@FUZZ
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_mask_round_trip(mask):
    """Every mask survives encode then decode exactly."""
    h, w = mask.shape
    assert (rle_to_mask(mask_to_rle(mask), w, h) == mask).all()


@FUZZ
@given(st.lists(st.integers(0, 255), min_size=1, max_size=400), st.integers(1, 30), st.integers(1, 30))
def test_rle_to_mask_refuses_other_sizes(rle, w, h):
    """rle_to_mask gives a mask of exactly the asked size or RLEError."""
    try:
        mask = rle_to_mask(rle, w, h)
    except RLEError:
        return
    assert mask.shape == (h, w)


ROUTES = ["/setup", "/predict", "/webhook"]


def _fine(route: str, response) -> bool:
    if response.status_code < 500:
        return response.is_json and "error" in response.json if response.status_code >= 400 else True
    return route == "/predict" and response.status_code == 503 and "no worker" in response.json["error"]


@FUZZ
@given(st.sampled_from(ROUTES), json_values)
def test_random_bodies_never_give_a_server_error(client, route, body):
    """Random JSON to every route: 2xx, or a 4xx JSON error (never a 500 or an HTML page)."""
    response = client.post(route, json=body)
    assert _fine(route, response), (route, body, response.status_code, response.get_data(as_text=True)[:300])


FIELDS = {
    "/setup": ({"project": "1.1", "schema": CONFIG_XML, "hostname": "", "access_token": ""},
               ["project", "schema", "hostname", "access_token", "extra_params"]),
    "/predict": ({"project": "1.1", "label_config": CONFIG_XML, "tasks": [{"id": 1, "data": {"image": "x"}}]},
                 ["project", "label_config", "tasks", "params"]),
}


@FUZZ
@given(st.sampled_from(sorted(FIELDS)), st.data())
def test_each_field_of_valid_bodies_mutated(client, route, data):
    """One field of a valid /setup or /predict body replaced by anything: never a server error."""
    base, names = FIELDS[route]
    name = data.draw(st.sampled_from(names))
    body = {**base, name: data.draw(json_values)}
    if route == "/predict":
        client.post("/setup", json=FIELDS["/setup"][0])
    response = client.post(route, json=body)
    assert _fine(route, response), (route, body, response.status_code, response.get_data(as_text=True)[:300])


@FUZZ
@given(st.data())
def test_mutated_annotation_events_never_give_a_server_error(client, data):
    """A real annotation event with one nested field replaced by anything: 2xx or a 4xx naming the problem."""
    client.post("/setup", json=FIELDS["/setup"][0])
    event = annotation_event(10, 100, *square_scene(0, (12, 16)))
    target = data.draw(st.sampled_from([
        ("annotation", "id"), ("annotation", "result"), ("task", "id"), ("task", "data"), ("annotation", "task"),
        ("region", "from_name"), ("region", "type"), ("region", "original_width"), ("region", "value"),
        ("value", "rle"), ("value", "brushlabels"), ("value", "format"), (None, "action"), (None, "project"),
    ]))
    where, key = target
    holder = {None: event, "annotation": event["annotation"], "task": event["task"],
              "region": event["annotation"]["result"][0], "value": event["annotation"]["result"][0]["value"]}[where]
    holder[key] = data.draw(json_values)
    response = client.post("/webhook", json=event)
    assert _fine("/webhook", response), (target, response.status_code, response.get_data(as_text=True)[:300])


@pytest.mark.parametrize("depth", [1200, 100000])
def test_deeply_nested_json(client, depth):
    """JSON nested thousands deep: 400, not a RecursionError page."""
    for route in ROUTES:
        response = client.post(route, data="[" * depth + "]" * depth, content_type="application/json")
        assert response.status_code == 400 and "nested too deeply" in response.json["error"]
