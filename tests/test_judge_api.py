"""The API judge against a local fake server (127.0.0.1 only) that misbehaves on purpose:
dropped connections, 429 with Retry-After, 5xx, 401, a key echoed back, slow answers."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from safemoe_jax.judging import api as judge_api
from safemoe_jax.judging import labels as judge_labels

KEY = "sk-test-" + "K" * 40


class _Server(http.server.BaseHTTPRequestHandler):
  script: list = []  # one action per request, then "ok": "drop" | (status, headers, body)
  requests: list = []
  in_flight = 0
  max_in_flight = 0
  delay = 0.0
  lock = threading.Lock()

  def do_POST(self):  # noqa: N802
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    cls = type(self)
    with cls.lock:
      action = cls.script.pop(0) if cls.script else "ok"
      cls.requests.append({"auth": self.headers.get("Authorization"), "body": body,
                           "action": action})
      cls.in_flight += 1
      cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
    try:
      time.sleep(cls.delay)
      if action == "drop":  # the connection dies before any answer
        self.close_connection = True
        self.connection.shutdown(2)
        return
      if action != "ok":
        status, headers, text = action
        self.send_response(status)
        for k, v in headers.items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(text.encode())
        return
      score = 5 if "COMPLY" in body["messages"][0]["content"] else 1
      out = json.dumps({"choices": [{"message": {"content": f"#thescore: {score}"}}]})
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.end_headers()
      self.wfile.write(out.encode())
    finally:
      with cls.lock:
        cls.in_flight -= 1

  def log_message(self, *a):
    pass


@pytest.fixture()
def server(monkeypatch):
  _Server.script, _Server.requests, _Server.in_flight, _Server.max_in_flight = [], [], 0, 0
  _Server.delay = 0.0
  monkeypatch.setenv("OPENAI_API_KEY", KEY)
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
  th = threading.Thread(target=srv.serve_forever, daemon=True)
  th.start()
  yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
  srv.shutdown()


def _judge(url: str, **kw) -> tuple[judge_api.APIJudge, list[float]]:
  j = judge_api.APIJudge("stub", base_url=url, timeout_s=10, **kw)
  waits: list[float] = []
  j._sleep = waits.append  # record the backoff instead of sleeping
  return j, waits


def test_dropped_connections_and_5xx_are_retried_with_backoff(server):
  _Server.script = ["drop", (503, {}, "busy"), "drop"]
  j, waits = _judge(server, max_retries=3, backoff_s=0.5)
  v = j.judge(["q"], ["COMPLY"])
  assert v[0].label == "harmful" and len(_Server.requests) == 4
  assert len(waits) == 3 and all(0 < w <= 60 for w in waits)
  assert waits[2] > waits[0]  # exponential: 0.5 * 2**k * [0.5, 1.5)


def test_429_waits_what_retry_after_says(server):
  _Server.script = [(429, {"Retry-After": "7"}, "slow down"), (429, {"Retry-After": "900"}, "")]
  j, waits = _judge(server, max_retries=2, max_wait_s=30)
  assert j.judge(["q"], ["no"])[0].label == "refusal"
  assert waits == [7.0, 30.0]  # as asked, capped at max_wait_s


def test_401_is_not_retried_and_an_echoed_key_never_leaks(server):
  # The key sits across the 300-character cut of the error body.
  _Server.script = [(401, {}, "x" * 290 + f" invalid key Bearer {KEY} for this org")]
  j, waits = _judge(server, max_retries=5)
  with pytest.raises(judge_labels.JudgeError, match="HTTP 401") as e:
    j.judge(["q"], ["COMPLY"])
  assert len(_Server.requests) == 1 and waits == []
  assert KEY[:10] not in str(e.value) and "K" * 8 not in str(e.value)
  assert _Server.requests[0]["auth"] == f"Bearer {KEY}"


def test_retries_are_bounded(server):
  _Server.script = ["drop"] * 10
  j, waits = _judge(server, max_retries=2)
  with pytest.raises(judge_labels.JudgeError, match=r"request to .* failed .*after 3 attempts"):
    j.judge(["q"], ["COMPLY"])
  assert len(_Server.requests) == 3 and len(waits) == 2


def test_concurrency_is_bounded_and_every_verdict_is_cached_as_it_arrives(server, tmp_path):
  from safemoe_jax.evaluation import cache as eval_cache
  from safemoe_jax.evaluation import verdicts as eval_verdicts
  _Server.delay = 0.05
  j, _ = _judge(server, max_retries=0, concurrency=2)
  gens = {("sys", f"prompt {i}"): {"response": "COMPLY" if i % 2 else "no"} for i in range(8)}
  cache = eval_cache.JsonlCache(tmp_path / "verdicts.jsonl")
  out = eval_verdicts.judge_all([j], gens, cache, progress=False, log=lambda m: None)
  assert len(out) == 8 and _Server.max_in_flight <= 2
  # A failure part-way (the 5th request is refused): the answers already paid for are kept.
  _Server.script = ["ok"] * 4 + [(401, {}, "revoked")]
  j1, _ = _judge(server, max_retries=0, concurrency=1)
  gens2 = {("sys", f"other {i}"): {"response": "no"} for i in range(8)}
  cache2 = eval_cache.JsonlCache(tmp_path / "verdicts2.jsonl")
  with pytest.raises(judge_labels.JudgeError, match="HTTP 401"):
    eval_verdicts.judge_all([j1], gens2, cache2, progress=False, log=lambda m: None)
  kept = [json.loads(l) for l in (tmp_path / "verdicts2.jsonl").read_text().splitlines()]
  # (a request already under way when the error came may be answered and kept too)
  assert 4 <= len(kept) <= 5 and all(r["label"] == "refusal" for r in kept)
  # Run again: only what is missing is asked for.
  n = len(_Server.requests)
  eval_verdicts.judge_all([j1], gens2, eval_cache.JsonlCache(tmp_path / "verdicts2.jsonl"), progress=False,
              log=lambda m: None)
  assert len(_Server.requests) - n == 8 - len(kept)
