"""Link emulation as a transport wrapper: one-way delay, jitter, loss and bandwidth per peer.

Each agent in an emulated fleet talks through a :class:`LinkEmulator` wrapped around its real
transport. Messages addressed to one node (tasks, results, pings, pongs: the node is in the topic)
are held back by the link to that node before they reach the broker; broadcasts (heartbeats, state)
use the sender's default link. Serialisation is modelled per link: a message waits until the link
has finished sending the previous one, then takes ``size / bandwidth`` seconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from topics.names import Kind, TopicTree
from topics.transport import ConnectListener, Handler, Message, NotConnectedError, Transport

_UNICAST = frozenset({Kind.TASK, Kind.RESULT, Kind.PING, Kind.PONG})


@dataclass(frozen=True, slots=True)
class LinkParams:
    """One direction of a link: one-way delay and jitter (s), loss probability, bytes per second."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    bandwidth: float | None = None


class DelayScheduler:
    """One thread running callbacks at their due time (monotonic), shared by many emulators."""

    def __init__(self, name: str = "link-scheduler") -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_at(self, due: float, callback: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._order), callback))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:  # noqa: BLE001 - a failed delayed publish must not stop the links
                self.errors += 1

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(2.0)


class LinkEmulator:
    """A :class:`~topics.transport.Transport` that delays, drops and paces what it publishes."""

    def __init__(self, inner: Transport, *, node_id: str, tree: TopicTree,
                 link_to: Callable[[str | None], LinkParams], scheduler: DelayScheduler,
                 rng: random.Random) -> None:
        self._inner, self._node_id, self._tree = inner, node_id, tree
        self._link_to = link_to
        """Link parameters towards a peer node (``None``: the default link)."""
        self._scheduler, self._rng = scheduler, rng
        self._busy_until: dict[str | None, float] = {}
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._offline = False
        self._connect_listeners: list[ConnectListener] = []

    @property
    def client_id(self) -> str:
        return self._inner.client_id

    @property
    def connected(self) -> bool:
        return self._inner.connected and not self._offline

    def go_offline(self) -> None:
        """Emulate a lost broker connection: publishing fails, what arrives is lost (a clean
        session), until :meth:`come_back`."""
        self._offline = True

    def come_back(self) -> None:
        """The connection is back: the connect listeners run, as after a reconnect."""
        if not self._offline:
            return
        self._offline = False
        self.counters["offline_returns"] += 1
        for listener in list(self._connect_listeners):
            listener()

    def _gated(self, handler: Handler) -> Handler:
        def deliver(message: Message) -> None:
            if self._offline:
                self.counters["lost_offline"] += 1
                return
            handler(message)
        return deliver

    @property
    def inner(self) -> Transport:
        return self._inner

    def set_will(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        self._inner.set_will(topic, payload, qos=qos, retain=retain)

    def add_connect_listener(self, listener: ConnectListener) -> None:
        self._connect_listeners.append(listener)

        def on_connect() -> None:
            if not self._offline:
                listener()
        self._inner.add_connect_listener(on_connect)

    def connect(self, *, timeout: float | None = None) -> None:
        self._inner.connect(timeout=timeout)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        self._inner.subscribe(topic_filter, self._gated(handler), qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self._inner.unsubscribe(topic_filter)

    def _peer(self, topic: str) -> str | None:
        parsed = self._tree.parse(topic)
        if parsed is None or parsed.kind not in _UNICAST or parsed.pool is not None:
            return None
        return None if parsed.node == self._node_id else parsed.node

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        if not self.connected:
            raise NotConnectedError("not connected", topic=topic)
        peer = self._peer(topic)
        link = self._link_to(peer)
        if link.loss and self._rng.random() < link.loss:
            self.counters["lost"] += 1
            return
        now = time.monotonic()
        with self._lock:
            start = max(now, self._busy_until.get(peer, now))
            transfer = len(payload) / link.bandwidth if link.bandwidth else 0.0
            self._busy_until[peer] = start + transfer
        jitter = self._rng.uniform(-link.jitter, link.jitter) if link.jitter else 0.0
        due = start + transfer + max(0.0, link.delay + jitter)
        if due - now < 0.0002:
            self._inner.publish(topic, payload, qos=qos, retain=retain)
            return
        self.counters["delayed"] += 1

        def send() -> None:
            if self._offline:
                self.counters["lost_offline"] += 1
                return
            try:
                self._inner.publish(topic, payload, qos=qos, retain=retain)
            except NotConnectedError:
                self.counters["lost_disconnected"] += 1

        self._scheduler.call_at(due, send)

    def close(self, *, timeout: float = 5.0) -> None:
        self._inner.close(timeout=timeout)

    def abort(self) -> None:
        self._inner.abort()

    def stats(self) -> dict[str, int]:
        merged = Counter(self._inner.stats())
        merged.update(self.counters)
        return dict(merged)
