"""How the fleet tells this server is alive: its retained state (birth on every connect, death as the
Will and on a clean stop), heartbeats with its load, and answers to pings.

A ping is answered at once, on the dispatch thread, ahead of any queued work, so that a device's
measured round trip is the network's, not the queue's. Birth, death and heartbeats share the session
number of the current start, so that a late Will cannot kill a newer session.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Literal

from agent_common.decoding import decode_or_count
from cloud_agent.home_assistant import discovery_messages
from cloud_agent.node import ServerNode
from cloud_agent.replies import BadInput, Replies
from topics.models import Heartbeat, Load, NodeState, Ping, Pong, Role
from topics.names import DELIVERY, Kind
from topics.transport import Message, TransportError

log = logging.getLogger("cloud_agent.server")  # the server's one logger, as before its modules split

_STATE = DELIVERY[Kind.STATE]


def _version() -> str:
    try:
        return importlib.metadata.version("mqtt-offload")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Liveness:
    """Birth, death, heartbeats and pong answers of one server node.

    ``flush`` runs after each heartbeat (the summaries of the rate-limited logs); ``rng`` jitters
    the heartbeat interval.
    """

    def __init__(self, node: ServerNode, replies: Replies, *, flush: Callable[[], None],
                 rng: random.Random) -> None:
        self._node = node
        self._replies = replies
        self._flush = flush
        self._rng = rng
        self.session = 0
        """Session number of the current start (ms timestamp), shared by birth, heartbeats and Will."""
        self._seq = 0
        self.cpu_share = 0.0
        """This process's share of the machine's CPU between the last two heartbeats."""
        self._cpu_mark = (time.process_time(), node.monotonic())

    def begin(self) -> None:
        """A new session: register its Will, and publish its birth on every (re)connect."""
        node = self._node
        self.session = int(node.clock() * 1000)
        node.transport.set_will(node.tree.state(node.id), self._state_payload("offline"),
                                qos=_STATE.qos, retain=_STATE.retain)
        node.transport.add_connect_listener(self._on_connect)

    def publish_offline(self) -> None:
        """The clean death: the retained state ``offline`` of this session."""
        node = self._node
        try:
            node.transport.publish(node.tree.state(node.id), self._state_payload("offline"),
                                   qos=_STATE.qos, retain=_STATE.retain)
        except TransportError as exc:
            log.warning("%s could not publish its offline state: %s", node.id, exc)

    def _state_payload(self, status: Literal["online", "offline"]) -> bytes:
        node = self._node
        birth = status == "online"
        state = NodeState(node=node.id, role=Role.SERVER, status=status, session=self.session,
                          time=max(0.0, node.clock()), tasks=tuple(node.registry.names()) if birth else (),
                          interval=node.config.heartbeat_interval if birth else None,
                          pools=tuple(node.config.pools) if birth else ())
        return self._replies.channel_codec(Kind.STATE).encode(state)

    def _on_connect(self) -> None:
        node = self._node
        try:
            node.transport.publish(node.tree.state(node.id), self._state_payload("online"),
                                   qos=_STATE.qos, retain=_STATE.retain)
            node.board.count("births")
        except TransportError as exc:
            log.warning("%s could not publish its birth: %s", node.id, exc)
        if node.config.home_assistant:
            self._announce_to_home_assistant()

    def _announce_to_home_assistant(self) -> None:
        """Home Assistant discovery configs, retained, after every connect (after the birth)."""
        node = self._node
        messages = discovery_messages(node.id, node.tree, node.registry.names(), version=_version(),
                                      discovery_prefix=node.config.home_assistant_prefix)
        try:
            for topic, data in messages:
                node.transport.publish(topic, data, qos=1, retain=True)
        except TransportError as exc:
            log.warning("%s could not publish its Home Assistant discovery: %s", node.id, exc)

    def load(self) -> Load:
        """What the next heartbeat will report."""
        return self._node.board.load(self.cpu_share)

    def heartbeat_loop(self) -> None:
        """The ``<id>-heartbeat`` thread: a heartbeat every interval (jittered) until ``stopping``."""
        interval, stopping = self._node.config.heartbeat_interval, self._node.stopping
        while not stopping.is_set():
            self._publish_heartbeat()
            self._flush()
            if stopping.wait(interval * self._rng.uniform(0.9, 1.1)):
                return

    def _publish_heartbeat(self) -> None:
        node = self._node
        cpu_now, wall_now = time.process_time(), node.monotonic()
        cpu_then, wall_then = self._cpu_mark
        if wall_now > wall_then:
            share = (cpu_now - cpu_then) / ((wall_now - wall_then) * (os.cpu_count() or 1))
            self.cpu_share = min(1.0, max(0.0, share))
        self._cpu_mark = (cpu_now, wall_now)
        heartbeat = Heartbeat(node=node.id, role=Role.SERVER, session=self.session,
                              seq=self._seq, interval=node.config.heartbeat_interval,
                              time=max(0.0, node.clock()), capabilities=node.registry.capabilities(),
                              pools=tuple(node.config.pools), load=self.load())
        self._seq += 1
        try:
            data = self._replies.channel_codec(Kind.HEARTBEAT).encode(heartbeat)
            node.transport.publish(node.tree.heartbeat(node.id), data, qos=DELIVERY[Kind.HEARTBEAT].qos)
            node.board.count("heartbeats")
        except TransportError as exc:
            node.board.count("heartbeats_failed")
            log.debug("%s heartbeat not sent: %s", node.id, exc)

    def on_ping(self, message: Message) -> None:
        """Answer a ping at once, on the dispatch thread, ahead of any queued work."""
        node, replies = self._node, self._replies
        codec = replies.codec_for(message)
        ping = decode_or_count(codec, message, Ping, replies.bad_input, kind=None,
                               on_error=lambda exc: replies.dead_letter(message, exc))
        if ping is None:
            return
        try:
            replies.rules.check(ping.reply_to, ping.sender)
        except BadInput as exc:
            replies.reject(message, exc)
            return
        pong = Pong(nonce=ping.nonce, responder=node.id, sent=ping.sent)
        try:
            node.transport.publish(ping.reply_to, codec.encode(pong), qos=DELIVERY[Kind.PONG].qos)
            node.board.count("pings")
        except TransportError as exc:
            log.debug("%s pong not sent: %s", node.id, exc)


__all__ = ["Liveness"]
