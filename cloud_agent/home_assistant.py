"""Home Assistant MQTT discovery: each server appears there as a device with sensors, unconfigured.

With ``home_assistant = true`` a server publishes, retained, one discovery config per sensor on
``<discovery prefix>/<component>/<node>/<sensor>/config`` after every connect. The sensors read the
server's own JSON channels (its retained state and its heartbeats) with Home Assistant templates, so
nothing else is published: ``online`` (a binary sensor from the state), queue length, tasks in
flight, workers, CPU share, and the service time of each task it serves, in milliseconds (0 until
the task first ran there). The state
record is also the device's availability, so every sensor shows "unavailable" once the server dies.
Configs of tasks the server no longer serves are left as they are (clear them with an empty
retained message if a task is removed for good).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from topics.names import TopicTree

DEFAULT_DISCOVERY_PREFIX = "homeassistant"
_OBJECT_ID = re.compile(r"[^A-Za-z0-9_-]")

__all__ = ["DEFAULT_DISCOVERY_PREFIX", "discovery_messages", "object_id"]


def object_id(text: str) -> str:
    """``text`` as a Home Assistant object id: letters, digits, ``_`` and ``-`` only."""
    return _OBJECT_ID.sub("_", text)


def _load(field: str) -> str:
    return f"{{{{ value_json.load.{field} }}}}"


def discovery_messages(node: str, tree: TopicTree, tasks: Iterable[str], *, version: str,
                       discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX) -> list[tuple[str, bytes]]:
    """``(topic, JSON config)`` for every sensor of server ``node`` serving ``tasks``."""
    node_object = object_id(node)
    state_topic, heartbeat_topic = tree.state(node), tree.heartbeat(node)
    device = {"identifiers": [f"mqtt-offload-{node_object}"], "name": f"offload server {node}",
              "manufacturer": "mqtt-offload", "model": "cloud-agent", "sw_version": version}
    availability = {"availability_topic": state_topic,
                    "availability_template": "{{ value_json.status }}",
                    "payload_available": "online", "payload_not_available": "offline"}

    def config(component: str, sensor: str, name: str, **fields: Any) -> tuple[str, bytes]:
        body = {"name": name, "unique_id": f"offload_{node_object}_{object_id(sensor)}",
                "object_id": f"offload_{node_object}_{object_id(sensor)}", "device": device,
                **availability, **fields}
        topic = f"{discovery_prefix}/{component}/{node_object}/{object_id(sensor)}/config"
        return topic, json.dumps(body, sort_keys=True).encode()

    messages = [
        config("binary_sensor", "online", "online", state_topic=state_topic,
               value_template="{{ value_json.status }}", payload_on="online", payload_off="offline",
               device_class="connectivity"),
        config("sensor", "queue_length", "queue", state_topic=heartbeat_topic,
               value_template=_load("queue_length"), unit_of_measurement="tasks",
               state_class="measurement"),
        config("sensor", "in_flight", "in flight", state_topic=heartbeat_topic,
               value_template=_load("in_flight"), unit_of_measurement="tasks",
               state_class="measurement"),
        config("sensor", "workers", "workers", state_topic=heartbeat_topic,
               value_template=_load("workers"), entity_category="diagnostic"),
        config("sensor", "cpu", "CPU", state_topic=heartbeat_topic,
               value_template="{{ (value_json.load.cpu * 100) | round(1) }}",
               unit_of_measurement="%", state_class="measurement"),
    ]
    for task in sorted(set(tasks)):
        key = json.dumps(task)  # a JSON string is a valid Jinja string literal
        messages.append(config(
            "sensor", f"service_{task}", f"{task} service time", state_topic=heartbeat_topic,
            value_template=(f"{{{{ (value_json.load.service_time.get({key}, 0) * 1000) "
                            f"| round(2) }}}}"),
            unit_of_measurement="ms", state_class="measurement", device_class="duration"))
    return messages
