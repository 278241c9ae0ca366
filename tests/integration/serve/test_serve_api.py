"""The Serve app over real HTTP on loopback: labels and scores, every bad request, the API key, overload."""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import numpy as np
import pytest
import requests

LABELS = ["negative", "positive"]  # the classes of the trained_classifier fixture

pytestmark = pytest.mark.timeout(300)


def post(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + "/v1/classify", data=data, headers={"Content-Type": "application/json"},
                         timeout=30, **kw)


def test_labels_and_scores_match_the_predictor(serve_apps, trained_classifier, separable_texts):
    from bertray.predictor import Predictor

    texts, labels = separable_texts(24, seed=3)
    # max_texts is 8 in the test app: send the texts from concurrent callers so the batcher mixes them.
    chunks = [texts[i:i + 8] for i in range(0, len(texts), 8)]
    with cf.ThreadPoolExecutor(len(chunks)) as pool:
        responses = list(pool.map(lambda c: post(serve_apps["open"], {"texts": c, "probabilities": True}), chunks))
    for resp in responses:
        assert resp.status_code == 200, resp.text
    preds = [p for resp in responses for p in resp.json()["predictions"]]
    assert [p["label"] for p in preds] == [LABELS[y] for y in labels]

    expected = Predictor(trained_classifier).predict(texts).probs
    got = np.array([[p["probabilities"][n] for n in LABELS] for p in preds])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose([p["score"] for p in preds], expected.max(axis=1), atol=1e-5)
    assert responses[0].json()["model"] == trained_classifier


def test_probabilities_only_when_asked(serve_apps):
    r = post(serve_apps["open"], {"texts": ["a good film"]})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert set(pred) == {"label", "score"} and pred["label"] == "positive"


def test_model_info_and_health(serve_apps, trained_classifier):
    info = requests.get(serve_apps["open"] + "/v1/model", timeout=10).json()
    assert info["model"] == trained_classifier
    assert info["labels"] == LABELS
    assert info["metrics"] == {"accuracy": 1.0}
    assert info["limits"] == {"max_texts": 8, "max_text_chars": 200}
    assert requests.get(serve_apps["open"] + "/healthz", timeout=10).json() == {"status": "ok"}
    spec = requests.get(serve_apps["open"] + "/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert requests.get(serve_apps["open"] + "/docs", timeout=10).status_code == 200


BAD_REQUESTS = [
    # (what is sent, expected status, words the message must contain)
    ({"texts": []}, 422, ["texts", "empty list"]),
    ({"texts": ["ok"] * 9}, 413, ["texts", "9 texts", "at most 8"]),
    ({"texts": ["ok", "ok", "ok", "x" * 201]}, 413, ["texts[3]", "longer than 200 characters"]),
    ({"texts": ["ok", "  "]}, 422, ["texts[1]", "empty text"]),
    ({"texts": ["ok", 7, "fine"]}, 422, ["texts[1]", "valid string"]),
    ({"texts": "just one string"}, 422, ["texts", "valid list"]),
    ({"texts": None}, 422, ["texts", "valid list"]),
    ({"text": ["ok"]}, 422, ["texts", "required"]),
    ({"texts": ["ok"], "probabilities": "yes"}, 422, ["probabilities", "valid boolean"]),
    ({"texts": ["ok"], "extra": 1}, 422, ["extra", "not permitted"]),
    (["ok"], 422, ["body", "valid dictionary"]),
    (b'{"texts": ["ok",]}', 400, ["malformed JSON", "line 1 column"]),
    (b'{"texts": ["ok"]', 400, ["malformed JSON"]),
    (b"", 400, ["empty body"]),
    (b"\xff\xfe{}", 400, ["not UTF-8"]),
    (b"[" * 100_000, 400, ["nested too deeply"]),
]


@pytest.mark.parametrize("body,status,words", BAD_REQUESTS, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_4xx_saying_what_and_where(serve_apps, body, status, words):
    r = post(serve_apps["open"], body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, f"{w!r} not in {detail!r}"


def test_oversized_body_is_refused_before_parsing(serve_apps):
    body = json.dumps({"texts": ["x" * 200] * 8}).encode() + b" " * 3_000_000
    r = post(serve_apps["open"], body)
    assert r.status_code == 413 and "byte limit" in r.json()["detail"], r.text


def test_api_key(serve_apps, serve_api_key):
    url = serve_apps["keyed"]
    body = {"texts": ["a good film"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": serve_api_key}):
        r = requests.post(url + "/v1/classify", json=body, headers=headers, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["detail"], r.text
        assert requests.get(url + "/v1/model", headers=headers, timeout=10).status_code == 401
    # Even a malformed body is refused for want of the key first.
    assert requests.post(url + "/v1/classify", data=b"{", timeout=10).status_code == 401
    ok = {"Authorization": f"Bearer {serve_api_key}"}
    r = requests.post(url + "/v1/classify", json=body, headers=ok, timeout=10)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "positive", r.text
    assert requests.get(url + "/v1/model", headers=ok, timeout=10).status_code == 200
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert 'content="bearer"' in requests.get(url + "/", timeout=10).text
    assert 'content="none"' in requests.get(serve_apps["open"] + "/", timeout=10).text


def test_many_malformed_requests_leave_the_service_healthy(serve_apps):
    url = serve_apps["open"] + "/v1/classify"
    bad = [b"{", b'{"texts": 5}', b'{"texts": []}', b'{"texts": [null]}', b"[[[[", b'{"texts": ["' + b"y" * 300 + b'"]}',
           b"\x80", b'{"texts": ["ok"], "probabilities": 3}']
    statuses = set()
    with requests.Session() as s:
        for i in range(1000):
            r = s.post(url, data=bad[i % len(bad)], headers={"Content-Type": "application/json"}, timeout=10)
            statuses.add(r.status_code)
        assert statuses <= {400, 413, 422}, statuses
        assert s.get(serve_apps["open"] + "/healthz", timeout=10).status_code == 200
        r = s.post(url, json={"texts": ["a good film", "an awful film"]}, timeout=10)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == ["positive", "negative"]


def test_overload_gets_a_fast_503(serve_apps):
    """max_ongoing_requests=1 and max_queued_requests=1 with a 1 s batch wait: of 12 simultaneous callers, one runs,
    one waits, and the rest are turned away at once rather than queued."""
    url = serve_apps["tight"]

    def call(_):
        t = time.perf_counter()
        r = requests.post(url + "/v1/classify", json={"texts": ["a good film"]}, timeout=30)
        return r.status_code, time.perf_counter() - t

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    codes = [c for c, _ in results]
    assert codes.count(200) >= 1 and codes.count(503) >= 8, codes
    assert set(codes) <= {200, 503}, codes
    assert max(t for c, t in results if c == 503) < 0.9, results  # turned away before the 1 s batch wait ends
    r = requests.post(url + "/v1/classify", json={"texts": ["a good film"]}, timeout=30)
    assert r.status_code == 200, r.text
