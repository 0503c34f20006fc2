"""Bridge from existing MQTT topics to tasks: no Python needed on the publishing side.

Each :class:`~edge_agent.config.BridgeRoute` subscribes to a filter (``sensors/+/frame``), decodes
every message (JSON, CBOR or raw bytes), submits it as a task through the edge agent (so it runs
locally or offloaded like any other task) and publishes the result to the rendered output topic
(``results/{1}/ball``: ``{1}`` is the level the first ``+`` matched).

A message that cannot be decoded, would publish to a topic matching its own filter (a loop), or
names a task nobody runs is counted and logged (rate-limited), never fatal. Failed tasks publish
nothing; they are counted and logged the same way.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent_common.badinput import BadInputLog
from agent_common.registry import RegistryError
from edge_agent.config import BridgeRoute, render_output
from edge_agent.records import TaskFailed
from topics.codec import Codec, EncodeError
from topics.errors import DecodeError, TopicError
from topics.names import topic_matches, validate_publish_topic, wildcard_captures
from topics.transport import Message, TransportError

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent

log = logging.getLogger(__name__)


class Bridge:
    """Routes bridged topics through tasks of one :class:`EdgeAgent`."""

    def __init__(self, agent: EdgeAgent, routes: Sequence[BridgeRoute], *,
                 codec: Codec | None = None) -> None:
        self._agent = agent
        self._routes = list(routes)
        self._codec = codec or Codec("json", max_payload=agent.config.max_payload)
        self.bad_input = BadInputLog(log)
        self.failures = BadInputLog(log)
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Subscribe every route on the agent's transport (kept across reconnects)."""
        for route in self._routes:
            self._agent.subscribe(route.filter, self._handler(route), qos=route.qos)
            log.info("node=%s bridge %s -> task %s -> %s (%s in, %s out)", self._agent.id, route.filter,
                     route.task, route.output, route.input_format, route.output_format)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    def _handler(self, route: BridgeRoute) -> Any:
        def handle(message: Message) -> None:
            self.handle(route, message)

        return handle

    def handle(self, route: BridgeRoute, message: Message) -> None:
        """Decode one bridged message and submit it; bad input is counted, never raised."""
        self._count("received")
        try:
            output = validate_publish_topic(render_output(route.output,
                                                          wildcard_captures(route.filter, message.topic)))
        except TopicError as exc:
            self.bad_input.record("bridge-topic", str(exc), topic=message.topic)
            return
        if topic_matches(route.filter, output):
            self.bad_input.record("bridge-loop", f"output {output} matches the route's own filter",
                                  topic=message.topic)
            return
        try:
            value = self._codec.decode_value(message.payload, route.input_format, topic=message.topic)
        except DecodeError as exc:
            self.bad_input.record(f"bridge-{exc.reason}", exc.detail, topic=message.topic)
            return
        origin = json.dumps({"bridge": route.filter, "output": output, "source": message.topic})
        try:
            future = self._agent.submit(route.task, value, deadline=route.deadline, origin=origin)
        except (RegistryError, ValueError, RuntimeError) as exc:
            self.bad_input.record("bridge-submit", str(exc), topic=message.topic)
            return
        self._count("submitted")
        future.add_done_callback(lambda done: self._publish(route, output, message.topic, done))

    def _publish(self, route: BridgeRoute, output: str, source: str,
                 done: concurrent.futures.Future[Any]) -> None:
        error = done.exception()
        if error is not None:
            self._count("failed")
            status = error.status if isinstance(error, TaskFailed) else type(error).__name__
            self.failures.record(f"task-{status}", str(error), topic=source)
            return
        try:
            data = self._codec.encode_value(done.result(), route.output_format)
        except EncodeError as exc:
            self._count("unencodable")
            self.failures.record("bridge-encode", str(exc), topic=output)
            return
        try:
            self._agent.publish(output, data, qos=route.qos, retain=route.retain)
        except TransportError as exc:
            self._count("publish_failed")
            self.failures.record("bridge-publish", str(exc), topic=output)
            return
        self._count("published")

    def answer_recovered(self, name: str, origin: Any, done: concurrent.futures.Future[Any]) -> bool:
        """Publish the outcome of a task an earlier run of the agent spooled for one of these routes
        (``origin``: what :meth:`handle` stored with it), as the route would have; False if no route
        of this configuration matches it any more."""
        if not isinstance(origin, dict):
            return False
        route = next((r for r in self._routes if r.filter == origin.get("bridge") and r.task == name), None)
        output, source = origin.get("output"), origin.get("source")
        if route is None or not isinstance(output, str) or not isinstance(source, str):
            return False
        try:
            output = validate_publish_topic(output)
        except TopicError:
            return False
        if topic_matches(route.filter, output):
            return False
        self._count("recovered")
        self._publish(route, output, source, done)
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            values: dict[str, Any] = dict(self.counters)
        values["bad_input"] = self.bad_input.snapshot()
        values["failures"] = self.failures.snapshot()
        return values


__all__ = ["Bridge"]
