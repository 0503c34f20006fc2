"""The fleet dashboard without a browser: the brokers' WebSockets listeners, the shipped page and its
command (``edge-agent dashboard``). The page itself runs in tests/test_dashboard_browser.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from brokers_support import require_mosquitto

from topics.brokers import EmbeddedBroker, MosquittoBroker, websocket_answers, write_mosquitto_config


def test_mosquitto_config_adds_a_websockets_listener_after_the_first_ones_options(tmp_path: Path) -> None:
    text = write_mosquitto_config(tmp_path / "m.conf", port=1883, websockets_port=9001,
                                  username_as_client_id=True).read_text().splitlines()
    first, second = text.index("listener 1883 127.0.0.1"), text.index("listener 9001 127.0.0.1")
    assert first < text.index("use_username_as_clientid true") < second
    assert text[second + 1] == "protocol websockets"
    assert text[second + 2] == "use_username_as_clientid true"  # the ACL's client ids hold there too
    assert "protocol websockets" not in write_mosquitto_config(tmp_path / "n.conf", port=1883).read_text()


def test_a_plain_websockets_listener_is_refused_next_to_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bypass TLS"):
        write_mosquitto_config(tmp_path / "m.conf", port=8883, websockets_port=9001,
                               certfile=tmp_path / "c", keyfile=tmp_path / "k")


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_both_brokers_serve_mqtt_over_websockets(kind: str) -> None:
    if kind == "mosquitto":
        require_mosquitto()
    broker = MosquittoBroker(websockets_port=0) if kind == "mosquitto" else EmbeddedBroker(websockets_port=0)
    with broker:
        assert broker.ws_url == f"ws://127.0.0.1:{broker.websockets_port}"
        assert broker.websockets_port is not None
        assert websocket_answers("127.0.0.1", broker.websockets_port)
        if kind == "mosquitto":  # (amqtt would log an ERROR for the HTTP request on its MQTT port)
            assert not websocket_answers("127.0.0.1", broker.port)  # the MQTT port speaks no HTTP
    assert EmbeddedBroker().ws_url is None
