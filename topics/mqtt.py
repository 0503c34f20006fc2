"""The MQTT transport: paho-mqtt 2.x behind the narrow :class:`~topics.transport.Transport` interface.

This is the only module that imports paho. One network thread per transport runs paho's ``loop()``
and our reconnect loop (capped exponential backoff with jitter, every filter re-subscribed after
each reconnect); handlers run on a :class:`~topics.transport.Dispatcher` thread, never on the
network thread, so a slow handler cannot stall keepalives or acknowledgements.

Each received message goes to every handler whose filter matches it. Avoid overlapping filters on
one transport: brokers may send one copy per matching subscription (amqtt does), and each copy
reaches every matching handler.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MessageState, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from topics.names import topic_matches, validate_filter, validate_publish_topic
from topics.transport import (
    BrokerRefused,
    ConnectError,
    ConnectListener,
    Dispatcher,
    Handler,
    Message,
    NotConnectedError,
    TransportConfig,
    TransportError,
    backoff_delays,
)

log = logging.getLogger(__name__)

_LOOP_TIMEOUT = 0.5  # seconds paho's select() may block; publish() wakes it earlier
_RECONNECT_LOG_INTERVAL = 30.0  # at most one "still reconnecting" warning per interval
_STABLE_AFTER = 1.0  # a connection that lasted less than this keeps escalating the backoff
_LINK_LOG_BURST = 10  # connect/disconnect lines logged freely before rate limiting kicks in
_LINK_LOG_REFILL = 10.0  # seconds per extra connect/disconnect line once the burst is spent
_PAUSE_POLL = 0.005  # while reading is paused: how often the loop writes and checks for room
_STRIKES = 2  # a message in flight at this many connection losses in a row is dropped
_DROP_LOG_INTERVAL = 10.0  # at most one "dropped a refused message" warning per interval
_ROUTES = 1024  # received topics whose handlers are remembered (emptied when full)
_ROUTED_LENGTH = 256  # longer topics are matched against the filters every time

# CONNACK reason codes (MQTT 5 numbering; paho maps 3.1.1 return codes onto them).
_UNSUPPORTED_PROTOCOL = 132
_BAD_CREDENTIALS = 134
_NOT_AUTHORISED = 135
_BAD_CREDENTIALS_V3 = 4
_NOT_AUTHORISED_V3 = 5
_UNSUPPORTED_PROTOCOL_V3 = 1

_STAT_KEYS = ("published", "delivered", "dropped_dispatch_full", "handler_errors", "reconnects",
              "disconnects", "publish_queue_full", "publish_waited", "publish_dropped_refused",
              "subscribe_refused", "network_errors", "acks_stale", "read_pauses",
              "reconnect_failures", "sessions_resumed", "sessions_lost")
_IN_FLIGHT = frozenset({MessageState.MQTT_MS_WAIT_FOR_PUBACK, MessageState.MQTT_MS_WAIT_FOR_PUBREC,
                        MessageState.MQTT_MS_WAIT_FOR_PUBCOMP, MessageState.MQTT_MS_RESEND_PUBREL})


def _connack_problem(reason: ReasonCode | int, protocol: str) -> str:
    """One line explaining a refused CONNACK."""
    value = reason.value if isinstance(reason, ReasonCode) else int(reason)
    if value in (_BAD_CREDENTIALS, _BAD_CREDENTIALS_V3):
        return "not authorised: bad user name or password"
    if value in (_NOT_AUTHORISED, _NOT_AUTHORISED_V3):
        return "not authorised (check the user name and password)"
    if value in (_UNSUPPORTED_PROTOCOL, _UNSUPPORTED_PROTOCOL_V3):
        return f"the broker does not support MQTT {protocol} (amqtt speaks only 3.1.1)"
    return f"refused: {reason}"


class _Outbox:
    """paho's store of outgoing QoS 1/2 messages, seen from our side: room, forgetting, strikes.

    paho keeps every unacknowledged QoS>0 message and resends it after each reconnect. A message the
    broker refuses by closing the connection (Mosquitto does, for a malformed packet) would come back
    after every reconnect: the oldest message in flight at a connection loss gets a strike, and one
    with :data:`_STRIKES` strikes is dropped. paho has no public API for any of this, hence the
    guarded private access (``_out_messages``, ``_out_message_mutex``).
    """

    def __init__(self, client: paho.Client) -> None:
        self._client = client
        self._room = threading.Condition(threading.Lock())
        self._acknowledged = 0  # written by the network thread only
        self._waiters = 0
        self._strikes: dict[int, int] = {}

    @property
    def acknowledged(self) -> int:
        """How many outgoing messages were acknowledged so far (a change means room)."""
        return self._acknowledged

    @property
    def waiting(self) -> bool:
        """Whether a publisher waits for room (the network thread must keep reading acks)."""
        return self._waiters > 0

    def on_acknowledged(self, mid: int) -> None:
        """On the network thread, for every PUBACK/PUBCOMP (and every QoS 0 send)."""
        self._acknowledged += 1
        if self._strikes:
            self._strikes.pop(mid, None)
        if self._waiters:
            with self._room:
                self._room.notify_all()

    def wake(self) -> None:
        """Wake every waiting publisher (the link dropped: they should fail fast)."""
        with self._room:
            self._room.notify_all()

    def wait_for_room(self, seen: int, timeout: float, still_connected: Callable[[], bool]) -> bool:
        """Wait until an acknowledgement arrives after ``seen`` was read; False on timeout or loss."""
        end = time.monotonic() + timeout
        with self._room:
            self._waiters += 1
            try:
                while self._acknowledged == seen and still_connected():
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    self._room.wait(left)
            finally:
                self._waiters -= 1
        return still_connected()

    def pending(self) -> int:
        """Outgoing QoS 1/2 messages not acknowledged yet (queued or in flight)."""
        store = self._store()
        if store is None:
            return 0
        with store[0]:
            return len(store[1])

    def wait_drained(self, timeout: float, still_connected: Callable[[], bool]) -> bool:
        """Wait (bounded) until every outgoing QoS 1/2 message is acknowledged; False if not."""
        end = time.monotonic() + timeout
        while self.pending():
            seen = self._acknowledged
            left = end - time.monotonic()
            if left <= 0 or not still_connected():
                return False
            self.wait_for_room(seen, min(left, 0.05), still_connected)
        return True

    def _store(self) -> tuple[Any, dict[int, Any]] | None:
        lock = getattr(self._client, "_out_message_mutex", None)
        pending = getattr(self._client, "_out_messages", None)
        if lock is None or not isinstance(pending, dict):
            return None
        return lock, pending

    def forget(self, mid: int) -> None:
        """Drop a message paho kept although the caller was told it was not sent."""
        store = self._store()
        if store is None:
            return
        with store[0]:
            store[1].pop(mid, None)
        self._strikes.pop(mid, None)

    def strike(self) -> str | None:
        """At a connection loss: strike the oldest message in flight; drop it at the last strike.

        Returns the topic of the dropped message, or None.
        """
        store = self._store()
        if store is None:
            return None
        lock, pending = store
        with lock:
            oldest = next((message for message in pending.values()
                           if getattr(message, "state", None) in _IN_FLIGHT), None)
            if oldest is None:
                return None
            mid = int(oldest.mid)
            strikes = self._strikes.get(mid, 0) + 1
            if strikes < _STRIKES:
                self._strikes[mid] = strikes
                return None
            pending.pop(mid, None)
        self._strikes.pop(mid, None)
        topic: str = oldest.topic
        return topic


class _NoTopicCallbacks:
    """Stands in for paho's per-topic callbacks (``message_callback_add``), which this transport
    never registers: it routes every message itself.

    paho looks each received topic up there, and its lookup builds a closure that refers to itself:
    12 objects of cyclic garbage per message, which only the garbage collector frees, so a collection
    (which pauses every thread) ran every ~60 messages. Nothing registered matches nothing, at once.
    """

    def iter_match(self, topic: str) -> Iterator[Any]:
        return iter(())

    def __setitem__(self, topic_filter: str, callback: Any) -> None:
        raise TypeError("MqttTransport routes messages itself: no per-topic paho callbacks")

    def __delitem__(self, topic_filter: str) -> None:
        raise KeyError(topic_filter)


class MqttTransport:
    """A :class:`~topics.transport.Transport` over a real MQTT broker (3.1.1 or 5, optional TLS)."""

    def __init__(self, config: TransportConfig, *, name: str = "") -> None:
        self.config = config
        self._client_id = config.client_id or f"offload-{uuid.uuid4().hex[:16]}"
        self._name = name or self._client_id
        self._protocol = (MQTTProtocolVersion.MQTTv5 if config.protocol == "5"
                          else MQTTProtocolVersion.MQTTv311)
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=self._protocol,
            clean_session=None if config.protocol == "5" else not config.persistent_session,
            reconnect_on_failure=False,  # we reconnect ourselves, with jitter
            manual_ack=True,  # a QoS 1/2 message is acknowledged once its handlers returned
        )
        self._client.max_queued_messages_set(config.max_queued_messages)
        self._client.connect_timeout = config.connect_timeout
        if config.username is not None:
            password = config.password.get_secret_value() if config.password else None
            self._client.username_pw_set(config.username, password)
        if config.tls is not None:
            self._client.tls_set(
                ca_certs=config.tls.ca_file,
                certfile=config.tls.cert_file,
                keyfile=config.tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if config.tls.insecure:
                self._client.tls_insecure_set(True)
        self._client.on_socket_open = self._on_socket_open
        # Only the network thread may touch the socket. Without an external-loop hook, paho writes
        # straight from whichever thread calls publish() when its own loop thread is not used:
        # packets from two threads could interleave, and TLS sockets are not thread-safe. With the
        # hook set, publish() queues the packet and wakes our loop, which does the writing.
        self._client.on_socket_register_write = self._on_register_write
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._outbox = _Outbox(self._client)
        if isinstance(getattr(self._client, "_on_message_filtered", None), MQTTMatcher):
            setattr(self._client, "_on_message_filtered", _NoTopicCallbacks())  # noqa: B010 - private

        self._lock = threading.RLock()
        self._filters: dict[str, tuple[Handler, int]] = {}
        self._routes: dict[str, tuple[tuple[Handler, ...], int]] = {}
        """Per received topic: its handlers and the highest QoS they subscribed with (a memo of
        matching ``_filters``, emptied whenever they change; under ``_lock``)."""
        self._listeners: list[ConnectListener] = []
        self._pending_subacks: dict[int, tuple[threading.Event, list[ReasonCode]]] = {}
        self._counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._dispatch_totals: Counter[str] = Counter()
        self._link_tokens = float(_LINK_LOG_BURST)
        self._link_tokens_at = time.monotonic()
        self._link_suppressed = 0
        self._connected_since = 0.0
        self._dispatcher: Dispatcher | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connack = threading.Event()
        self._connack_problem: str | None = None
        self._connack_refused = False
        """The last CONNACK was a refusal (not a lost or silent connection)."""
        self._first_subscribed: threading.Event | None = None
        """Set when the filters subscribed before the first connect are acknowledged."""
        self._connected = False
        self._established = False
        self._session_present: bool | None = None
        self._closed = False
        self._link = 0  # changes at every connect and loss: acknowledgements of older links are void
        self._link_at_connect = 0
        self._ack_lock = threading.Lock()
        self._struck_link = -1
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._drops_unlogged = 0

    # ----------------------------------------------------------------------------------- properties
    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def session_present(self) -> bool | None:
        """Whether the broker resumed our session at the latest CONNACK (None before the first).

        With ``persistent_session``, True means what was queued for us while away is being
        delivered; False on a reconnect means it is lost (the session expired, the broker restarted
        without persistence, or it keeps no sessions): re-send what waits for an answer.
        """
        return self._session_present

    def socket_nodelay(self) -> bool | None:
        """Whether TCP_NODELAY is set on the live socket (None when there is no socket)."""
        sock = self._raw_socket()
        if sock is None:
            return None
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def _raw_socket(self) -> socket.socket | None:
        sock = self._client.socket()
        return sock if isinstance(sock, socket.socket) else None

    # ------------------------------------------------------------------------------------ set-up
    def set_will(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        """Register the Will; must be called before :meth:`connect`."""
        validate_publish_topic(topic)
        if self._thread is not None:
            raise TransportError("set_will must be called before connect()", topic=topic)
        self._client.will_set(topic, bytes(payload), qos=qos, retain=retain)

    def add_connect_listener(self, listener: ConnectListener) -> None:
        """Call ``listener`` on the dispatch thread after every (re)connect and re-subscription."""
        with self._lock:
            self._listeners.append(listener)

    def connect(self, *, timeout: float | None = None) -> None:
        """Connect, wait for CONNACK and start the network thread; :class:`ConnectError` on failure.

        Filters subscribed before this call are subscribed now, and it returns once the broker
        acknowledged them too (bounded by the same timeout), so a caller that announces itself
        right after (a birth message) is ready for what that brings in.
        """
        if self._closed:
            raise ConnectError(f"{self._name}: transport already closed; create a new one")
        if self._thread is not None:
            return
        wait = timeout if timeout is not None else self.config.connect_timeout
        self._set_connect_timeout(wait)
        url = self.config.url
        self._connack.clear()
        self._connack_problem = None
        self._connack_refused = False
        self._stopping.clear()
        try:
            if self.config.protocol == "5":
                # paho keeps the flag and the properties for every reconnect.
                self._client.connect(self.config.host, self.config.port, self.config.keepalive,
                                     clean_start=not self.config.persistent_session,
                                     properties=self._connect_properties())
            else:
                self._client.connect(self.config.host, self.config.port, self.config.keepalive)
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(f"cannot connect to {url}: TLS certificate rejected: "
                               f"{exc.verify_message or exc.reason}") from exc
        except ssl.SSLError as exc:
            raise ConnectError(f"cannot connect to {url}: TLS failed: {exc.reason or exc}") from exc
        except ConnectionRefusedError as exc:
            raise ConnectError(f"cannot connect to {url}: connection refused "
                               "(is the broker running on that port?)") from exc
        except TimeoutError as exc:
            raise ConnectError(f"cannot connect to {url}: no answer within {wait:.1f}s") from exc
        except socket.gaierror as exc:
            raise ConnectError(f"cannot connect to {url}: unknown host ({exc.strerror})") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {url}: {exc.strerror or exc}") from exc
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self._name, capacity=self.config.dispatch_queue)
        self._thread = threading.Thread(target=self._network_loop, name=f"mqtt-{self._name}",
                                        daemon=True)
        self._thread.start()
        if not self._connack.wait(wait) or self._connack_problem is not None:
            problem = self._connack_problem or f"no CONNACK within {wait:.1f}s"
            self._shutdown_threads(timeout=wait)
            error = BrokerRefused if self._connack_refused else ConnectError
            raise error(f"cannot connect to {url} as {self._client_id!r}: {problem}")
        subscribed = self._first_subscribed
        if subscribed is not None and not subscribed.wait(wait):
            log.warning("%s: subscriptions not acknowledged within %.1fs of connecting", self._name, wait)

    def _connect_properties(self) -> Properties | None:
        """MQTT 5 CONNECT properties: Receive Maximum and Session Expiry Interval, when set."""
        if self.config.receive_maximum is None and not self.config.persistent_session:
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.config.receive_maximum is not None:
            properties.ReceiveMaximum = self.config.receive_maximum
        if self.config.persistent_session:
            properties.SessionExpiryInterval = min(math.ceil(self.config.session_expiry), 0xFFFFFFFF)
        return properties

    def _set_connect_timeout(self, wait: float) -> None:
        """paho refuses to change the timeout while a failed attempt left its state "connecting";
        then the previous attempt's timeout stays (the retry itself works)."""
        if self._client.connect_timeout == wait:
            return
        try:
            self._client.connect_timeout = wait
        except RuntimeError:
            log.debug("%s: keeping connect timeout %.1fs", self._name, self._client.connect_timeout)

    # ---------------------------------------------------------------------------- subscriptions
    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; waits for SUBACK when connected."""
        validate_filter(topic_filter)
        with self._lock:
            self._filters[topic_filter] = (handler, qos)
            self._routes.clear()
        if not self._connected:
            return  # subscribed on (re)connect
        result, mid = self._client.subscribe(topic_filter, qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # the link just dropped: the reconnect re-subscribes every filter
        if threading.current_thread() is self._thread:
            return  # never block the network thread on its own SUBACK
        codes = self._await_suback(mid)
        if codes is not None and any(code.is_failure for code in codes):
            with self._lock:
                self._filters.pop(topic_filter, None)
                self._routes.clear()
            self._count("subscribe_refused")
            raise TransportError(f"broker refused the subscription: {codes[0]}", topic=topic_filter)

    def _await_suback(self, mid: int) -> list[ReasonCode] | None:
        """Wait (bounded) for the SUBACK of ``mid``; None if it did not come in time."""
        with self._lock:
            entry = self._pending_subacks.setdefault(mid, (threading.Event(), []))
        try:
            if entry[0].wait(self.config.connect_timeout):
                return entry[1]
            log.warning("%s: no SUBACK within %.1fs", self._name, self.config.connect_timeout)
            return None
        finally:
            with self._lock:
                self._pending_subacks.pop(mid, None)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._filters.pop(topic_filter, None) is not None
            self._routes.clear()
        if known and self._connected:
            self._client.unsubscribe(topic_filter)

    # ---------------------------------------------------------------------------------- publish
    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Send a message; :class:`NotConnectedError` when the link is down (nothing is queued).

        A QoS 1/2 publish that finds ``max_queued_messages`` unacknowledged waits up to
        ``publish_wait`` seconds for room (backpressure), then raises "outgoing queue full".
        """
        validate_publish_topic(topic)
        waited = False
        end = time.monotonic() + self.config.publish_wait
        while True:
            if not self._connected:
                raise NotConnectedError(f"{self._name}: not connected to {self.config.url}",
                                        topic=topic)
            seen = self._outbox.acknowledged
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._count("published")
                return
            if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                self._outbox.forget(info.mid)
                raise NotConnectedError(f"{self._name}: publish failed: {paho.error_string(info.rc)}",
                                        topic=topic)
            left = end - time.monotonic()
            if left <= 0 or threading.current_thread() is self._thread:
                self._count("publish_queue_full")
                raise TransportError(f"{self._name}: outgoing queue full "
                                     f"({self.config.max_queued_messages} messages)", topic=topic)
            if not waited:
                waited = True
                self._count("publish_waited")
            self._outbox.wait_for_room(seen, left, lambda: self._connected)

    # ---------------------------------------------------------------------------------- shutdown
    def close(self, *, timeout: float = 5.0, drain: float = 1.0) -> None:
        """Wait up to ``drain`` seconds for unacknowledged QoS 1 publishes, send DISCONNECT (the
        broker discards the Will), stop both threads; idempotent.

        Without the wait, a QoS 1 message published just before (a one-shot client's task, a
        death record) may be lost, and Mosquitto logs the client as "disconnected due to out of
        memory" when it closes with messages in flight.
        """
        if self._closed:
            return
        if self._connected and drain > 0 and threading.current_thread() is not self._thread \
                and not self._outbox.wait_drained(drain, lambda: self._connected):
            log.debug("%s: closing with %d unacknowledged message(s)", self._name, self._outbox.pending())
        self._closed = True
        self._stopping.set()
        if self._connected:
            self._client.disconnect()
        self._shutdown_threads(timeout=timeout)
        if self._established:
            self._log_link("%s: closed connection to %s", self._name, self.config.url)

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, like a crash: the broker publishes the Will."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        sock = self._raw_socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would tear down the
                # TLS object under the network thread's feet. A crash sends no close_notify either.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self._connected = False
        self._shutdown_threads(timeout=5.0)
        self._log_link("%s: aborted connection to %s (no DISCONNECT)", self._name, self.config.url)

    def _shutdown_threads(self, *, timeout: float) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s: network thread did not stop within %.1fs", self._name, timeout)
        self._thread = None
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._connected = False
        if self._dispatcher is not None:
            self._dispatcher.stop(timeout)
            self._dispatch_totals.update(self._dispatcher.counters)
            self._dispatcher = None

    def _log_link(self, message: str, *args: object) -> None:
        """INFO for connection events, rate limited (token bucket) so a flapping link cannot storm."""
        now = time.monotonic()
        self._link_tokens = min(float(_LINK_LOG_BURST),
                                self._link_tokens + (now - self._link_tokens_at) / _LINK_LOG_REFILL)
        self._link_tokens_at = now
        if self._link_tokens < 1.0:
            self._link_suppressed += 1
            return
        self._link_tokens -= 1.0
        if self._link_suppressed:
            message += f" ({self._link_suppressed} earlier connection events not logged)"
            self._link_suppressed = 0
        log.info(message, *args)

    def _count(self, key: str) -> None:
        with self._counter_lock:
            self._counters[key] += 1

    def stats(self) -> dict[str, int]:
        """Counters: published, delivered, dropped_dispatch_full, handler_errors, reconnects, ..."""
        merged: Counter[str] = Counter(dict.fromkeys(_STAT_KEYS, 0))
        with self._counter_lock:
            merged.update(self._counters)
        merged.update(self._dispatch_totals)
        if self._dispatcher is not None:
            merged.update(self._dispatcher.counters)
        return dict(merged)

    # ---------------------------------------------------------------------------- network thread
    def _network_loop(self) -> None:
        """paho's loop plus our reconnect policy; exits when stopping or when the first try fails."""
        next_delay: Callable[[], float] | None = None
        last_warning = 0.0
        failures = 0
        last_crash_log = -_RECONNECT_LOG_INTERVAL
        paused_since: float | None = None
        while True:
            try:
                if self._reading_paused():
                    now = time.monotonic()
                    if paused_since is None:
                        paused_since = now
                        self._count("read_pauses")
                    if now - paused_since < self.config.keepalive / 2:
                        rc = self._loop_without_reading()
                    else:  # read once in a while, or the missing PINGRESP would drop the link
                        paused_since = now
                        rc = self._client.loop(0.0)
                else:
                    paused_since = None
                    rc = self._client.loop(_LOOP_TIMEOUT)
            except Exception:  # a malformed packet or a paho bug must not kill this thread
                self._count("network_errors")
                now = time.monotonic()
                if now - last_crash_log > _RECONNECT_LOG_INTERVAL:
                    last_crash_log = now
                    log.exception("%s: network loop failed; dropping the connection", self._name)
                sock = self._raw_socket()
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
                rc = MQTTErrorCode.MQTT_ERR_UNKNOWN
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self._stopping.is_set() and not self._connected:
                    return  # connect() gave up on a first try that got no CONNACK, or abort()
                if (next_delay is not None and self._connected
                        and time.monotonic() - self._connected_since > _STABLE_AFTER):
                    next_delay, failures = None, 0  # a fresh backoff once a connection proved stable
                continue
            if self._stopping.is_set():
                return
            if not self._established:
                if self._connack_problem is None:
                    hint = (" (does the broker speak MQTT 5?)" if self.config.protocol == "5"
                            else " (not an MQTT port, or one that expects TLS?)")
                    self._connack_problem = f"connection closed before CONNACK{hint}"
                self._connack.set()
                return
            self._strike_in_flight()
            self._mark_disconnected("connection lost")
            if next_delay is None:
                next_delay = backoff_delays(self.config.reconnect_min_delay,
                                            self.config.reconnect_max_delay)
            if self._stopping.wait(next_delay()):
                return
            try:
                self._client.reconnect()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                failures += 1
                self._count("reconnect_failures")
                now = time.monotonic()
                if failures == 1 or now - last_warning > _RECONNECT_LOG_INTERVAL:
                    last_warning = now
                    log.warning("%s: reconnect to %s failed (%d attempts so far): %s",
                                self._name, self.config.url, failures, exc)

    def _reading_paused(self) -> bool:
        """Stop reading while the dispatcher holds ``dispatch_queue`` unacknowledged messages, unless
        a publisher waits for acknowledgements. Brokers' in-flight windows are no bound: amqtt has
        none, Mosquitto 2.0.11 keeps sending while acknowledgements trickle in."""
        dispatcher = self._dispatcher
        return (dispatcher is not None and self._connected and not self._outbox.waiting
                and dispatcher.unacknowledged >= dispatcher.capacity)

    def _loop_without_reading(self) -> MQTTErrorCode:
        """One turn of the loop that writes and keeps the link alive but reads nothing."""
        if self._client.want_write():
            rc = self._client.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        rc = self._client.loop_misc()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._stopping.wait(_PAUSE_POLL)
        return rc

    def _strike_in_flight(self) -> None:
        """Once per lost link: the oldest message in flight gets a strike; drop it at the last."""
        if self._struck_link == self._link_at_connect:
            return
        self._struck_link = self._link_at_connect
        topic = self._outbox.strike()
        if topic is None:
            return
        self._count("publish_dropped_refused")
        now = time.monotonic()
        if now - self._last_drop_log < _DROP_LOG_INTERVAL:
            self._drops_unlogged += 1
            return
        self._last_drop_log = now
        more = f" ({self._drops_unlogged} more since the last report)" if self._drops_unlogged else ""
        self._drops_unlogged = 0
        log.warning("%s: dropped a QoS>0 message to %.200r: the connection was lost %d times in a "
                    "row with it in flight (the broker refuses it?)%s", self._name, topic, _STRIKES,
                    more)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """Nothing to register: paho already woke our loop, whose select() watches for writability."""

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self.config.tcp_nodelay:
            # Nagle's algorithm meets delayed ACKs: ~44 ms per QoS 1 round trip without this.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            problem = _connack_problem(reason, self.config.protocol)
            if not self._established:
                self._connack_problem = problem
                self._connack_refused = True
                self._connack.set()
            else:
                log.warning("%s: %s refused the reconnect: %s", self._name, self.config.url, problem)
            return
        first = not self._established
        self._established = True
        self._note_session(bool(getattr(flags, "session_present", False)), first=first)
        with self._ack_lock:
            self._link += 1
            self._link_at_connect = self._link
        self._connected = True
        self._connected_since = time.monotonic()
        if first:
            session = ""
            if self.config.persistent_session:
                session = ", session resumed" if self._session_present else ", new session"
            self._log_link("%s: connected to %s (MQTT %s%s)", self._name, self.config.url,
                           self.config.protocol, session)
        else:
            self._count("reconnects")
            self._log_link("%s: reconnected to %s", self._name, self.config.url)
        with self._lock:
            filters = [(topic_filter, qos) for topic_filter, (_h, qos) in self._filters.items()]
            listeners = list(self._listeners)
        resubscribed = threading.Event()
        if filters:
            result, mid = client.subscribe(filters)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._lock:
                    entry = self._pending_subacks.setdefault(mid, (threading.Event(), []))
                waiter = entry[0]
            else:
                waiter = resubscribed
                resubscribed.set()
        else:
            waiter = resubscribed
            resubscribed.set()
        if first:
            self._first_subscribed = waiter
        dispatcher = self._dispatcher
        if dispatcher is not None:  # call() never blocks, even behind a stuck handler
            dispatcher.call(lambda: self._after_connect(waiter, listeners))
        self._connack.set()

    def _note_session(self, present: bool, *, first: bool) -> None:
        """Record CONNACK's session-present flag; a persistent session lost on a reconnect is logged."""
        self._session_present = present
        if not self.config.persistent_session:
            return
        if present:
            self._count("sessions_resumed")
        elif not first:
            self._count("sessions_lost")
            log.warning("%s: %s kept no session for %r: messages sent to us while away are lost "
                        "(session expired, broker restarted, or a broker that drops sessions)",
                        self._name, self.config.url, self._client_id)

    def _after_connect(self, subscribed: threading.Event, listeners: list[ConnectListener]) -> None:
        """On the dispatch thread: wait (bounded) for the re-subscription, then run the listeners."""
        if not subscribed.wait(self.config.connect_timeout):
            log.warning("%s: re-subscription not acknowledged within %.1fs",
                        self._name, self.config.connect_timeout)
        with self._lock:
            for mid, (event, _codes) in list(self._pending_subacks.items()):
                if event is subscribed:
                    del self._pending_subacks[mid]
        for listener in listeners:
            try:
                listener()
            except Exception:
                self._count("handler_errors")
                log.exception("%s: connect listener failed", self._name)

    def _mark_disconnected(self, why: str) -> None:
        if not self._connected:
            return
        with self._ack_lock:
            self._link += 1
        self._connected = False
        self._outbox.wake()
        self._count("disconnects")
        self._log_link("%s: disconnected from %s: %s", self._name, self.config.url, why)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        if self._stopping.is_set():
            with self._ack_lock:
                self._link += 1
            self._connected = False
            self._outbox.wake()
            return
        self._mark_disconnected(str(reason))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode],
                      properties: Any) -> None:
        with self._lock:
            entry = self._pending_subacks.setdefault(mid, (threading.Event(), []))
        entry[1].extend(codes)
        entry[0].set()
        refused = [code for code in codes if code.is_failure]
        if refused:
            log.warning("%s: broker refused %d subscription(s): %s", self._name, len(refused), refused[0])

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._outbox.on_acknowledged(mid)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """Hand a message to the dispatcher. QoS 0 (or a QoS 0 subscription) may be dropped when
        the dispatcher is full; QoS 1/2 never is, and is acknowledged after its handlers ran."""
        topic = message.topic
        delivered = Message(topic, bytes(message.payload), message.qos, bool(message.retain))
        with self._lock:
            route = self._routes.get(topic)
            if route is None:
                route = self._route(topic)
        handlers, best_qos = route
        dispatcher = self._dispatcher
        qos = message.qos
        reliable = qos > 0 and best_qos > 0
        if qos > 0 and (not reliable or dispatcher is None):
            self._acknowledge(message.mid, qos, self._link)  # nothing waits for it
        if dispatcher is None:
            return
        if reliable:
            mid, link = message.mid, self._link
            dispatcher.deliver_acked(handlers, delivered, lambda: self._acknowledge(mid, qos, link))
            return
        for handler in handlers:
            dispatcher.deliver(handler, delivered)

    def _route(self, topic: str) -> tuple[tuple[Handler, ...], int]:
        """The handlers of ``topic`` and their highest QoS, remembered (caller holds ``_lock``)."""
        matched = [(handler, qos) for topic_filter, (handler, qos) in self._filters.items()
                   if topic_matches(topic_filter, topic)]
        route = (tuple(handler for handler, _q in matched), max((q for _h, q in matched), default=0))
        if len(topic) <= _ROUTED_LENGTH:
            if len(self._routes) >= _ROUTES:
                self._routes.clear()
            self._routes[topic] = route
        return route

    def _acknowledge(self, mid: int, qos: int, link: int) -> None:
        """PUBACK/PUBCOMP ``mid``, unless the link it came on is gone (the id means nothing now)."""
        with self._ack_lock:
            if link != self._link:
                self._count("acks_stale")
                return
            self._client.ack(mid, qos)
