"""Webhooks: a job that names a callback URL is told of each change of its state.

An outbox: every status change of such a job writes a delivery row in the same transaction as the
change (`record`, called from app.core.jobs), so no event is lost with the process that made it. The
API process delivers them (`Dispatcher`, a thread; the worker forks job processes and must not hold
HTTP or SQLite locks at a fork): each POST is signed, retried with exponential backoff until it gets
a 2xx or runs out of attempts, and every attempt's outcome is kept for `GET /v1/jobs/{id}/webhooks`.
Several API processes may deliver: a row is leased by a conditional UPDATE before it is sent.

The signature, as Stripe's: header `Coft-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>" with the job's callback secret>`; a receiver recomputes it and refuses old timestamps.

Outbound calls go only to public addresses: a host that resolves to a private, loopback, link-local
or otherwise non-global address is refused, at job creation and again before each delivery (DNS can
change), unless the operator allows it (COFT_WEBHOOK_ALLOWED_HOSTS: host names or CIDR ranges).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from datetime import timedelta
from urllib.parse import urlparse

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.errors import Invalid
from app.core.models import Job, WebhookDelivery, new_id, utcnow
from app.core.settings import Settings

log = logging.getLogger("app.webhooks")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _allowed(host: str, addresses: list[str], settings: Settings) -> bool:
    allowed = settings.webhook_allowed_hosts
    if host in allowed:
        return True
    networks = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            pass  # a host name, compared above
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if not (ip.is_global or any(ip in network for network in networks)):
            return False
    return bool(addresses)


def check_callback_url(url: str, settings: Settings) -> None:
    """Invalid (`callback-not-allowed`) unless the URL is http(s) to a host the service may call."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise Invalid("callback-not-allowed", "callback_url must be an http:// or https:// URL with a host")
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except OSError:
        raise Invalid("callback-not-allowed", f"callback host {parsed.hostname!r} does not resolve") from None
    addresses = sorted({info[4][0] for info in infos})
    if not _allowed(parsed.hostname, addresses, settings):
        raise Invalid("callback-not-allowed", f"callback host {parsed.hostname!r} resolves to {', '.join(addresses)}: "
                      "private, loopback and link-local addresses are not called (COFT_WEBHOOK_ALLOWED_HOSTS)",
                      "Callback not allowed")


def record(session: Session, job_id: str) -> None:
    """Queue an event for the job's new state, in the caller's transaction (no-op without a callback)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not job.callback_url:
        return
    event = f"job.{job.status.value}"
    payload = {"event": event, "job": {"id": job.id, "status": job.status.value, "stage": job.stage,
                                       "progress": job.progress, "classifier_id": job.classifier_id,
                                       "error": {"code": job.error_code, "message": job.error_message}
                                       if job.error_code else None}}
    session.add(WebhookDelivery(id=new_id("wh"), job_id=job.id, tenant_id=job.tenant_id, event=event,
                                payload=payload, status="pending", attempts=0, next_attempt_at=utcnow()))


class Dispatcher(threading.Thread):
    """Delivers due webhook events every `webhook_poll_s` (in the API process)."""

    def __init__(self, settings: Settings):
        super().__init__(name="coft-webhooks", daemon=True)
        self.settings = settings
        self._stopping = threading.Event()
        self._http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)

    def run(self) -> None:
        while not self._stopping.wait(self.settings.webhook_poll_s):
            try:
                deliver_due(self.settings, self._http)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the deliveries
                log.warning("webhook delivery pass failed", exc_info=True)

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)
        self._http.close()


def deliver_due(settings: Settings, http: httpx.Client, limit: int = 20) -> int:
    """Send the due deliveries this process can lease; returns how many it sent."""
    now = utcnow()
    with session_scope(settings.database_url) as session:
        due = session.execute(select(WebhookDelivery.id, WebhookDelivery.next_attempt_at).where(
            WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    sent = 0
    for delivery_id, due_at in due:
        lease = utcnow() + timedelta(seconds=settings.webhook_timeout_s + 5)
        with session_scope(settings.database_url) as session:
            leased = session.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at == due_at).values(next_attempt_at=lease)).rowcount == 1
        if leased:
            _attempt(settings, http, delivery_id)
            sent += 1
    return sent


def _attempt(settings: Settings, http: httpx.Client, delivery_id: str) -> None:
    with session_scope(settings.database_url) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        job = session.get(Job, delivery.job_id)
        url, secret, payload, event = job.callback_url, job.callback_secret, delivery.payload, delivery.event
    body = json.dumps(payload, separators=(",", ":")).encode()
    status_code, error = None, None
    try:
        check_callback_url(url, settings)
        response = http.post(url, content=body, headers={
            "Content-Type": "application/json", "Coft-Event": event, "Coft-Delivery": delivery_id,
            "Coft-Signature": sign(secret, int(time.time()), body)})
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except Invalid as refused:
        error = refused.detail
    except httpx.HTTPError as failure:
        error = f"{type(failure).__name__}: {failure}"[:500]
    with session_scope(settings.database_url) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        delivery.attempts += 1
        delivery.last_status_code, delivery.last_error, delivery.last_attempt_at = status_code, error, utcnow()
        if error is None:
            delivery.status, delivery.delivered_at = "delivered", utcnow()
        elif delivery.attempts >= settings.webhook_max_attempts:
            delivery.status = "failed"
        else:
            delivery.next_attempt_at = utcnow() + timedelta(
                seconds=min(settings.webhook_backoff_s * 2 ** (delivery.attempts - 1), 3600))
    log.info("webhook attempt", extra={"delivery_id": delivery_id, "event": event, "status_code": status_code,
                                       "error": error})


def deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
