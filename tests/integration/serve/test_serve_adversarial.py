"""Hostile texts among good ones, sent at once over real HTTP: each bad request gets its own 4xx naming the text,
and every good request batched beside it still gets its right answer.

A module of its own, with its own Serve app on a random tiny classifier: no fine-tuning needed, since the answers
are checked against the same model run in this process."""
from __future__ import annotations

import concurrent.futures as cf
import json
import threading

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.timeout(300)

LONE_SURROGATE = "\ud83d oops"  # valid JSON ("\ud83d" escaped), but no UTF-8 form: the tokenizer raises on it
GOOD = [
    ["a good film"],
    ["an awful film", "the plot was thin"],
    ["\u00e9t\u00e9 \u00e0 Paris, caf\u00e9 cr\u00e8me"],
    ["\U0001f600\U0001f525 loved it \U0001f44d"],  # astral characters as proper surrogate pairs in JSON
    ["\u5f88\u597d\u7684\u7535\u5f71", "\u0641\u064a\u0644\u0645 \u0631\u0627\u0626\u0639"],  # CJK, RTL
    ["\u200b\u200b zero-width", "tab\tand\nnewline"],
    ["nul \x00 inside", "\x7f\x1b[31m escape codes"],
    ["word " * 38],  # long: truncated at max_length
]
BAD = [
    ([LONE_SURROGATE], 0),
    (["fine", "fine too", "\udfff trailing half"], 2),
    (["\ud800"], 0),
]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_classifier_dir, healthy):
    from ray import serve

    from bertray.config import ServeConfig
    from bertray.runtime import free_ports
    from bertray.serve import build_app, start_http

    port = free_ports(1)[0]
    cfg = ServeConfig(model=tiny_classifier_dir, cpus_per_replica=0.5, max_texts=8, max_text_chars=400)
    start_http("127.0.0.1", port, cfg.ingress)
    try:
        serve.run(build_app(cfg), name="adversarial", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        healthy(url)
        yield url
    finally:
        serve.shutdown()


def _expected(model: str) -> dict[str, np.ndarray]:
    from bertray.predictor import Predictor

    texts = [t for req in GOOD for t in req]
    return dict(zip(texts, Predictor(model).predict(texts).probs))


def _burst(url: str, bodies: list[list[str]]) -> list[requests.Response]:
    """Every body POSTed at the same moment, each from its own connected session."""
    start = threading.Barrier(len(bodies))

    def call(texts):
        with requests.Session() as s:
            s.get(url + "/healthz", timeout=30)
            start.wait(timeout=30)
            # json.dumps escapes a lone surrogate as \udXXX, which is what a hostile client sends
            return s.post(url + "/v1/classify", data=json.dumps({"texts": texts, "probabilities": True}),
                          headers={"Content-Type": "application/json"}, timeout=60)

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(call, bodies))


def test_bad_texts_in_a_concurrent_batch_fail_alone(served, tiny_classifier_dir):
    expected = _expected(tiny_classifier_dir)
    bodies = [*GOOD * 5, *(b for b, _ in BAD)]  # 40 good requests, 3 bad, shuffled below
    order = np.random.default_rng(0).permutation(len(bodies))
    batched = 0
    for _ in range(3):
        sent = [bodies[i] for i in order]
        responses = _burst(served, sent)
        for texts, r in zip(sent, responses):
            bad_at = next((at for b, at in BAD if b is texts), None)
            if bad_at is not None:
                assert r.status_code == 422, (texts, r.status_code, r.text)
                detail = r.json()["detail"]
                assert f"texts[{bad_at}]" in detail and "not valid Unicode" in detail, detail
                continue
            assert r.status_code == 200, (texts, r.status_code, r.text)
            preds = r.json()["predictions"]
            got = np.array([[p["probabilities"][n] for n in ("negative", "positive")] for p in preds])
            np.testing.assert_allclose(got, np.stack([expected[t] for t in texts]), atol=1e-5)
            batched = max(batched, int(r.headers["X-Batch-Size"]))
    assert batched > 2, "no good request shared a pass with another: the burst did not test batching"


def test_after_the_attack_the_replica_still_answers(served):
    r = requests.post(served + "/v1/classify", json={"texts": ["still here"]}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("negative", "positive"), r.text


@pytest.mark.parametrize("headers", [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                                     {}])
def test_only_json_bodies_are_taken(served, headers):
    """A page on another site can POST text/plain or a form without a CORS preflight; JSON it cannot."""
    r = requests.post(served + "/v1/classify", data=b'{"texts": ["a good film"]}', headers=headers, timeout=30)
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"], r.text
    r = requests.post(served + "/v1/classify", data=b'{"texts": ["a good film"]}', timeout=30,
                      headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
