"""The narrow transport every agent talks to, and the pieces its implementations share.

Two implementations: :class:`topics.mqtt.MqttTransport` (paho-mqtt, the only module that imports
paho) and :class:`topics.memory.MemoryTransport` (in-process, for fast unit tests). Agents see bytes
and topics only; the codec lives in :mod:`topics.codec`.

Handlers run on one dispatch thread per transport, never on the network thread, in arrival order.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from topics.errors import WireError

log = logging.getLogger(__name__)

ProtocolVersion = Literal["3.1.1", "5"]


class TransportError(WireError):
    """Root of transport failures."""


class ConnectError(TransportError):
    """The broker could not be reached, refused us, or did not answer in time."""


class BrokerRefused(ConnectError):
    """The broker answered and refused us (credentials, authorisation, protocol version):
    retrying with the same settings cannot help, so agents treat it as fatal."""


class NotConnectedError(TransportError):
    """A publish was attempted while the connection is down; nothing was sent."""


@dataclass(frozen=True, slots=True)
class Message:
    """A received message as handlers see it."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


Handler = Callable[[Message], None]
ConnectListener = Callable[[], None]
_Item = tuple[tuple[Handler, ...], Message, Callable[[], None] | None]
_ERROR_LOG_INTERVAL = 10.0  # a failing handler's traceback is logged at most once per interval


class TlsConfig(BaseModel):
    """TLS settings; certificates are verified unless ``insecure`` is set explicitly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


class TransportConfig(BaseModel):
    """How to reach a broker. Build one from a URL with :meth:`from_url`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: ProtocolVersion = "3.1.1"
    client_id: str = ""
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    keepalive: int = Field(default=10, ge=1, le=65535)
    connect_timeout: float = Field(default=10.0, gt=0)
    reconnect_min_delay: float = Field(default=0.1, gt=0)
    #: Cap of the reconnect backoff (full jitter: each wait is uniform in [min, ceiling]): after an
    #: outage the transport is back within about this long of the broker answering again.
    reconnect_max_delay: float = Field(default=1.0, gt=0, le=3600)
    max_queued_messages: int = Field(default=10_000, ge=0)
    #: Seconds a QoS 1/2 publish waits for room when ``max_queued_messages`` are unacknowledged
    #: (backpressure) before it raises "outgoing queue full"; 0 raises at once.
    publish_wait: float = Field(default=0.0, ge=0, le=3600)
    dispatch_queue: int = Field(default=10_000, ge=1)
    #: MQTT 5 Receive Maximum sent in CONNECT: QoS 1/2 messages the broker may send before we
    #: acknowledge them. Unset: the broker's own limit (Mosquitto ``max_inflight_messages``, also for
    #: MQTT 5 clients; 3.1.1 has no such field).
    receive_maximum: int | None = Field(default=None, ge=1, le=65535)
    tcp_nodelay: bool = True
    #: Keep our session on the broker across disconnects and restarts (MQTT 3.1.1 clean session
    #: off; MQTT 5 clean start off plus ``session_expiry``): QoS 1/2 messages matching our
    #: subscriptions that arrive while we are away are queued by the broker and delivered when a
    #: client with the same ``client_id`` (required) connects again. Mosquitto keeps them (up to its
    #: ``max_queued_messages``; QoS 0 only with ``queue_qos0_messages``); amqtt drops the sessions
    #: of anonymous clients.
    persistent_session: bool = False
    #: MQTT 5: seconds the broker keeps the session once the link is gone (4294967295: for ever),
    #: rounded up to whole seconds. MQTT 3.1.1 has no such field: the broker decides (Mosquitto:
    #: ``persistent_client_expiration``, unset = for ever).
    session_expiry: float = Field(default=3600.0, gt=0, le=4294967295, allow_inf_nan=False)

    @model_validator(mode="after")
    def _stable_client_id(self) -> TransportConfig:
        if self.persistent_session and not self.client_id:
            raise ValueError("persistent_session needs a client_id: the broker finds the session by it")
        return self

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> TransportConfig:
        """Parse ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        secure = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if secure else 1883)
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r}: {exc}") from exc
        values: dict[str, object] = {"host": parts.hostname, "port": port}
        if parts.username:
            values["username"] = unquote(parts.username)
        if parts.password:
            values["password"] = unquote(parts.password)
        if secure:
            values["tls"] = TlsConfig()
        values.update(overrides)
        return cls.model_validate(values)

    @property
    def url(self) -> str:
        """The broker address without credentials, for logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def backoff_delays(
    min_delay: float, max_delay: float, rng: random.Random | None = None
) -> Callable[[], float]:
    """Capped exponential backoff with full jitter: each call returns the next delay."""
    chooser = rng or random.Random()
    attempt = 0

    def next_delay() -> float:
        nonlocal attempt
        ceiling = min(max_delay, min_delay * (2**attempt))
        attempt = min(attempt + 1, 62)
        return chooser.uniform(min_delay, max(min_delay, ceiling))

    return next_delay


class Dispatcher:
    """Runs handlers on one thread, in order, off the network thread.

    Two kinds of delivery share one FIFO hand-off (a :class:`queue.SimpleQueue`: C, no Python-level
    condition variable, about 30 times cheaper per message than :class:`queue.Queue`):

    * :meth:`deliver` (QoS 0, or a subscription that asked for QoS 0): dropped when ``capacity``
      messages are waiting, counted, logged at most once a second.
    * :meth:`deliver_acked` (QoS 1/2 the transport has not acknowledged yet): never dropped; the
      ``ack`` callback runs once every handler has returned, so the broker's in-flight window, not
      this queue, bounds how many wait. :attr:`unacknowledged` tells the transport when to stop
      reading from its socket (brokers without a window).

    Connect callbacks and the stop marker are never refused.
    """

    def __init__(self, name: str, *, capacity: int = 10_000) -> None:
        self._queue: queue.SimpleQueue[_Item | Callable[[], None] | None] = queue.SimpleQueue()
        self._capacity = capacity
        self.counters: Counter[str] = Counter()
        self._handed = 0  # acked deliveries queued (written by the delivering thread only)
        self._finished = 0  # ... and acknowledged (written by the dispatch thread only)
        self._last_drop_log = 0.0
        self._last_error_log = -_ERROR_LOG_INTERVAL
        self._errors_unlogged = 0
        self._thread = threading.Thread(target=self._run, name=f"dispatch-{name}", daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def unacknowledged(self) -> int:
        """Messages handed over with an ``ack`` whose handlers have not all returned yet."""
        return self._handed - self._finished

    def deliver(self, handler: Handler, message: Message) -> None:
        """Queue a message for its handler; a full queue drops it (counted, logged once a second)."""
        if self._queue.qsize() < self._capacity:
            self._queue.put(((handler,), message, None))
            return
        self.counters["dropped_dispatch_full"] += 1
        now = time.monotonic()
        if now - self._last_drop_log > 1.0:
            self._last_drop_log = now
            log.warning("dispatch queue full, dropped %d QoS 0 messages so far (latest on %s)",
                        self.counters["dropped_dispatch_full"], message.topic)

    def deliver_acked(self, handlers: Sequence[Handler], message: Message,
                      ack: Callable[[], None] | None) -> None:
        """Queue a message for every handler in ``handlers``, never dropped; then ``ack()``."""
        if ack is not None:
            self._handed += 1
        self._queue.put((tuple(handlers), message, ack))

    def call(self, callback: Callable[[], None]) -> None:
        """Run a callback on the dispatch thread (connect listeners), never dropped."""
        self._queue.put(callback)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, tuple):
                self._handle(*item)
                continue
            try:
                item()
            except Exception:  # noqa: BLE001 - counted, traceback logged rate-limited
                self._failed()

    def _handle(self, handlers: tuple[Handler, ...], message: Message,
                ack: Callable[[], None] | None) -> None:
        for handler in handlers:
            try:
                handler(message)
                self.counters["delivered"] += 1
            except Exception:  # noqa: BLE001 - counted, traceback logged rate-limited
                self._failed()
        if ack is None:
            return
        try:
            ack()
        except Exception:  # noqa: BLE001 - counted, traceback logged rate-limited
            self._failed()
        finally:
            self._finished += 1

    def _failed(self) -> None:
        """Count a failed handler; log its traceback at most once per interval (a summary after)."""
        self.counters["handler_errors"] += 1
        now = time.monotonic()
        if now - self._last_error_log < _ERROR_LOG_INTERVAL:
            self._errors_unlogged += 1
            return
        self._last_error_log = now
        more = f" ({self._errors_unlogged} more failures not logged)" if self._errors_unlogged else ""
        self._errors_unlogged = 0
        log.exception("handler failed%s", more)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued (waiting at most ``timeout``), then stop the thread."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():  # a handler is stuck: the thread is a daemon, do not wait
            log.warning("dispatch thread still busy after %.1fs; not waiting for the handler",
                        timeout)


class Transport(Protocol):
    """What agents need from MQTT: nothing more."""

    @property
    def client_id(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    def set_will(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        """Register the Will; must be called before :meth:`connect`."""

    def add_connect_listener(self, listener: ConnectListener) -> None:
        """Call ``listener`` on the dispatch thread after every (re)connect and re-subscription."""

    def connect(self, *, timeout: float | None = None) -> None:
        """Connect and start the network loop; raises :class:`ConnectError` if the first try fails.
        Later losses are reconnected with backoff, re-subscribing every filter."""

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (kept across reconnects)."""

    def unsubscribe(self, topic_filter: str) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Send a message; raises :class:`NotConnectedError` when the link is down."""

    def close(self, *, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker discards the Will) and stop all threads."""

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would: the broker sends the Will."""

    def stats(self) -> dict[str, int]:
        """Counters: delivered, dropped, handler errors, reconnects."""
