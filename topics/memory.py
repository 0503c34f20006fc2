"""An in-process broker and transport with the same interface as the MQTT one, for fast unit tests.

Messages still travel as encoded bytes, filters use real MQTT matching (``+``, ``#``, ``$share``
groups served round-robin), retained messages and Wills work; delivery goes through the same
:class:`~topics.transport.Dispatcher` as the real transport, with the same rule: a QoS 1/2 message
on a QoS 1/2 subscription is never dropped, QoS 0 may be when the dispatcher is full.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from dataclasses import dataclass, field

from topics.names import topic_matches, validate_filter, validate_publish_topic
from topics.transport import (
    ConnectError,
    ConnectListener,
    Dispatcher,
    Handler,
    Message,
    NotConnectedError,
)


@dataclass
class _Subscription:
    transport: MemoryTransport
    topic_filter: str
    handler: Handler
    group: str | None
    qos: int = 1


@dataclass
class MemoryBroker:
    """Routes messages between :class:`MemoryTransport` instances in one process."""

    retained: dict[str, Message] = field(default_factory=dict)
    _subscriptions: list[_Subscription] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _round_robin: Counter[str] = field(default_factory=Counter)
    online: bool = True
    _clients: dict[str, MemoryTransport] = field(default_factory=dict)

    def route(self, message: Message) -> None:
        """Deliver to every matching plain subscription and to one member of each shared group."""
        with self._lock:
            if message.retain:
                if message.payload:
                    self.retained[message.topic] = message
                else:
                    self.retained.pop(message.topic, None)
            matched = [s for s in self._subscriptions if s.transport.connected
                       and topic_matches(s.topic_filter, message.topic)]
            groups: dict[str, list[_Subscription]] = {}
            plain: list[_Subscription] = []
            for sub in matched:
                (groups.setdefault(sub.group, []) if sub.group else plain).append(sub)
            chosen = plain[:]
            for group, members in groups.items():
                index = self._round_robin[group]
                self._round_robin[group] += 1
                chosen.append(members[index % len(members)])
        delivered = Message(message.topic, message.payload, message.qos, retain=False)
        for sub in chosen:
            sub.transport._deliver(sub.handler, delivered, reliable=delivered.qos > 0 and sub.qos > 0)

    def add(self, sub: _Subscription) -> None:
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions
                                   if not (s.transport is sub.transport
                                           and s.topic_filter == sub.topic_filter)]
            self._subscriptions.append(sub)
            retained = [] if sub.group else [m for t, m in self.retained.items()
                                             if topic_matches(sub.topic_filter, t)]
        for message in retained:
            sub.transport._deliver(sub.handler, message, reliable=message.qos > 0 and sub.qos > 0)

    def remove(self, transport: MemoryTransport, topic_filter: str | None = None) -> None:
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if not (
                s.transport is transport and topic_filter in (None, s.topic_filter))]

    def register(self, transport: MemoryTransport) -> None:
        with self._lock:
            previous = self._clients.get(transport.client_id)
            self._clients[transport.client_id] = transport
        if previous is not None and previous is not transport and previous.connected:
            previous.abort()  # MQTT takes over the session of a duplicate client id

    def unregister(self, transport: MemoryTransport) -> None:
        with self._lock:
            if self._clients.get(transport.client_id) is transport:
                del self._clients[transport.client_id]


class MemoryTransport:
    """A :class:`~topics.transport.Transport` on a :class:`MemoryBroker`."""

    _ids = itertools.count(1)

    def __init__(self, broker: MemoryBroker, client_id: str = "", *, dispatch_queue: int = 10_000) -> None:
        self._broker = broker
        self._dispatch_queue = dispatch_queue
        self._client_id = client_id or f"memory-{next(self._ids)}"
        self._connected = False
        self._will: Message | None = None
        self._filters: dict[str, tuple[Handler, int]] = {}
        self._listeners: list[ConnectListener] = []
        self._dispatcher: Dispatcher | None = None
        self.counters: Counter[str] = Counter()

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def connected(self) -> bool:
        return self._connected

    def set_will(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        self._will = Message(validate_publish_topic(topic), payload, qos, retain)

    def add_connect_listener(self, listener: ConnectListener) -> None:
        self._listeners.append(listener)

    def connect(self, *, timeout: float | None = None) -> None:
        if not self._broker.online:
            raise ConnectError("memory broker is offline")
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self._client_id, capacity=self._dispatch_queue)
        self._broker.register(self)
        self._connected = True
        for topic_filter, (handler, qos) in self._filters.items():
            self._broker.add(self._subscription(topic_filter, handler, qos))
        for listener in self._listeners:
            self._dispatcher.call(listener)

    def _subscription(self, topic_filter: str, handler: Handler, qos: int) -> _Subscription:
        group = topic_filter.split("/")[1] if topic_filter.startswith("$share/") else None
        return _Subscription(self, topic_filter, handler, group, qos)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        validate_filter(topic_filter)
        self._filters[topic_filter] = (handler, qos)
        if self._connected:
            self._broker.add(self._subscription(topic_filter, handler, qos))

    def unsubscribe(self, topic_filter: str) -> None:
        self._filters.pop(topic_filter, None)
        self._broker.remove(self, topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        validate_publish_topic(topic)
        if not self._connected:
            raise NotConnectedError("not connected to the memory broker", topic=topic)
        self.counters["published"] += 1
        self._broker.route(Message(topic, bytes(payload), qos, retain))

    def _deliver(self, handler: Handler, message: Message, *, reliable: bool) -> None:
        if self._dispatcher is None or not self._connected:
            return
        if reliable:
            self._dispatcher.deliver_acked((handler,), message, None)
        else:
            self._dispatcher.deliver(handler, message)

    def _drop(self, *, send_will: bool) -> None:
        if not self._connected:
            return
        self._connected = False
        self._broker.remove(self)
        self._broker.unregister(self)
        if send_will and self._will is not None:
            self._broker.route(self._will)

    def close(self, *, timeout: float = 5.0) -> None:
        self._drop(send_will=False)
        if self._dispatcher is not None:
            self._dispatcher.stop(timeout)
            self._dispatcher = None

    def abort(self) -> None:
        self._drop(send_will=True)

    def stats(self) -> dict[str, int]:
        merged = Counter(self.counters)
        if self._dispatcher is not None:
            merged.update(self._dispatcher.counters)
        return dict(merged)
