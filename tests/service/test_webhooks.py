"""Webhooks against a receiver on loopback: signed events for every state change, retried with
backoff, recorded; callback hosts checked against private ranges and the operator's allowlist."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.service.helpers import image_zip, wait_for
from tests.service.test_big_datasets import settings_changed
from tests.service.test_jobs import job_body, upload, wait_terminal

SECRET = "a-secret-of-sixteen+"


class Receiver:
    """An HTTP server on loopback answering POSTs with the next status of `answers` (then 200)."""

    def __init__(self, answers: list[int] = ()):
        self.answers, self.received = list(answers), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.answers.pop(0) if receiver.answers else 200
                receiver.received.append({"headers": dict(self.headers), "body": body, "answered": status,
                                          "at": time.monotonic()})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [json.loads(r["body"])["event"] for r in self.received if r["answered"] == 200]


@pytest.fixture
def receiver():
    made = []

    def make(answers: list[int] = ()) -> Receiver:
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()


def verify(headers: dict, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in headers["Coft-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 60


def test_every_state_change_is_posted_signed_and_recorded(worker_stack, api, receiver):
    hooks = receiver()
    dataset_id = upload(api, image_zip(12))
    job = api.post("/v1/jobs", json=job_body(dataset_id, callback={"url": hooks.url, "secret": SECRET})).json()
    assert job["callback_url"] == hooks.url and "secret" not in json.dumps(job)
    done = wait_terminal(api, job["id"])
    assert done["status"] == "succeeded"
    wait_for(lambda: hooks.events() == ["job.running", "job.succeeded"], 30, 0.05, "both events")
    for request in hooks.received:
        assert verify(request["headers"], request["body"]), request["headers"]
        assert request["headers"]["Coft-Event"] == json.loads(request["body"])["event"]
    final = json.loads(hooks.received[-1]["body"])
    assert final["job"] == {"id": job["id"], "status": "succeeded", "stage": final["job"]["stage"], "progress": 1.0,
                            "classifier_id": done["classifier_id"], "error": None}
    recorded = api.get(f"/v1/jobs/{job['id']}/webhooks").json()
    assert [(d["event"], d["status"], d["attempts"], d["last_status_code"]) for d in recorded] == [
        ("job.running", "delivered", 1, 200), ("job.succeeded", "delivered", 1, 200)]
    assert {r["headers"]["Coft-Delivery"] for r in hooks.received} == {d["id"] for d in recorded}


def test_a_failing_receiver_gets_retries_with_backoff_until_it_answers(stack, api, receiver):
    hooks = receiver([500, 503])
    dataset_id = upload(api, image_zip(4))
    with settings_changed(stack, webhook_backoff_s=0.3):
        stack.stop_worker()  # the job stays queued: its one event is the cancel
        job = api.post("/v1/jobs", json=job_body(dataset_id, callback={"url": hooks.url, "secret": SECRET})).json()
        assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        wait_for(lambda: hooks.events() == ["job.cancelled"], 30, 0.05, "the cancelled event, third time")
    assert [r["answered"] for r in hooks.received] == [500, 503, 200]
    gaps = [b["at"] - a["at"] for a, b in zip(hooks.received, hooks.received[1:])]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.55  # 0.3 s, then 0.6 s

    def recorded() -> tuple:  # the worker records the answer after the receiver has sent it: poll, not race
        [delivery] = api.get(f"/v1/jobs/{job['id']}/webhooks").json()
        return delivery["status"], delivery["attempts"], delivery["last_status_code"]
    wait_for(lambda: recorded()[0] != "pending", 30, 0.05, "the delivery's record")
    assert recorded() == ("delivered", 3, 200)


def test_a_receiver_that_never_answers_well_is_given_up(stack, api, receiver):
    hooks = receiver([500] * 10)
    with settings_changed(stack, webhook_backoff_s=0.05, webhook_max_attempts=3):
        stack.stop_worker()
        job = api.post("/v1/jobs", json=job_body(upload(api, image_zip(2)),
                                                 callback={"url": hooks.url, "secret": SECRET})).json()
        api.post(f"/v1/jobs/{job['id']}/cancel")
        wait_for(lambda: api.get(f"/v1/jobs/{job['id']}/webhooks").json()[0]["status"] == "failed", 30, 0.05,
                 "the delivery to be given up")
    [delivery] = api.get(f"/v1/jobs/{job['id']}/webhooks").json()
    assert delivery["attempts"] == 3 and delivery["last_error"] == "HTTP 500" and len(hooks.received) == 3


@pytest.mark.parametrize("url", ["http://10.0.0.7/hook", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/hook", "http://localhost:9/hook", "ftp://example.com/x",
                                 "http://192.168.1.1/"])
def test_private_and_link_local_callbacks_are_refused_by_default(stack, api, url):
    dataset_id = upload(api, image_zip(2))
    with settings_changed(stack, webhook_allowed_hosts=[]):
        refused = api.post("/v1/jobs", json=job_body(dataset_id, callback={"url": url, "secret": SECRET}))
    assert refused.status_code == 422 and refused.json()["type"].endswith("/callback-not-allowed"), refused.text
    short = api.post("/v1/jobs", json=job_body(dataset_id, callback={"url": "http://127.0.0.1/", "secret": "short"}))
    assert short.status_code == 422
