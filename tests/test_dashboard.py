"""The fleet dashboard without a browser: the brokers' WebSockets listeners, the shipped page and its
command (``edge-agent dashboard``). The page itself runs in tests/test_dashboard_browser.py."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

import pytest
from brokers_support import require_mosquitto

from edge_agent.cli import main
from edge_agent.dashboard import FILES, DashboardServer, inline_script_hash, page_path, page_query
from topics.brokers import EmbeddedBroker, MosquittoBroker, websocket_answers, write_mosquitto_config
from topics.models import DeadLetter, Heartbeat, NodeState, Pong, WireModel


def test_mosquitto_config_adds_a_websockets_listener_after_the_first_ones_options(tmp_path: Path) -> None:
    text = write_mosquitto_config(tmp_path / "m.conf", port=1883, websockets_port=9001,
                                  username_as_client_id=True).read_text().splitlines()
    first, second = text.index("listener 1883 127.0.0.1"), text.index("listener 9001 127.0.0.1")
    assert first < text.index("use_username_as_clientid true") < second
    assert text[second + 1] == "protocol websockets"
    assert text[second + 2] == "use_username_as_clientid true"  # the ACL's client ids hold there too
    assert "protocol websockets" not in write_mosquitto_config(tmp_path / "n.conf", port=1883).read_text()


def test_the_websockets_listener_speaks_tls_where_the_first_one_does(tmp_path: Path) -> None:
    text = write_mosquitto_config(tmp_path / "m.conf", port=8883, websockets_port=9443,
                                  certfile=tmp_path / "c", keyfile=tmp_path / "k").read_text().splitlines()
    second = text.index("listener 9443 127.0.0.1")
    assert text[second + 1:second + 4] == ["protocol websockets", f"certfile {tmp_path / 'c'}",
                                           f"keyfile {tmp_path / 'k'}"]


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


# ------------------------------------------------------------------------------------ the page
MQTT_JS_SHA256 = "f3cbeae580d3010048938ee370f2db0c15d16e6f7fc147cb32ae5510e571b387"


def test_the_page_and_mqtt_js_ship_as_package_data() -> None:
    folder = page_path().parent
    for name in FILES:
        assert (folder / name).is_file(), name
    assert hashlib.sha256((folder / "mqtt.min.js").read_bytes()).hexdigest() == MQTT_JS_SHA256
    assert MQTT_JS_SHA256 in (folder / "VENDORED.md").read_text()
    assert "MIT License" in (folder / "mqtt.js-LICENSE.md").read_text()
    package_data = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert set(FILES) <= set(package_data["edge_agent.dashboard"])


def test_the_content_security_policy_names_the_inline_script_and_forbids_eval() -> None:
    html = page_path().read_text()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html)
    assert policy is not None
    directives = dict(part.strip().split(" ", 1) for part in policy.group(1).split(";"))
    assert directives["default-src"] == "'none'"
    assert inline_script_hash(html) in directives["script-src"].split(), (
        f"the inline script changed: put {inline_script_hash(html)} in the page's script-src")
    assert "unsafe-eval" not in policy.group(1) and "unsafe-inline" not in directives["script-src"]


def test_the_page_writes_no_html_from_data() -> None:
    """Everything from the network goes in as text: no innerHTML, outerHTML, insertAdjacentHTML,
    document.write, eval or Function, no inline event handlers."""
    html = page_path().read_text()
    script = html.split("<script>", 1)[1]
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                      "Function(", "setAttribute(\"on"):
        assert forbidden not in script, forbidden
    assert not re.search(r"<[a-z]+[^>]* on[a-z]+=", html)


# ------------------------------------------------------------------------------------ the command
def test_page_query_checks_the_broker_url_and_the_prefix() -> None:
    assert page_query("ws://127.0.0.1:9001", "a/b") == "broker=ws%3A%2F%2F127.0.0.1%3A9001&prefix=a%2Fb"
    for bad in ("mqtt://127.0.0.1:1883", "ws://", "127.0.0.1:9001", "ws://h:99999"):
        with pytest.raises(ValueError):
            page_query(bad)
    with pytest.raises(ValueError, match="prefix"):
        page_query("ws://h:9001", "a/+/b")
    assert page_query("wss://h:9443", username="operator").endswith("&username=operator")
    with pytest.raises(ValueError, match="node id is its user name"):
        page_query("wss://h:9443", username="two words")


def test_dashboard_print_gives_the_installed_page_with_its_query(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--ws-broker", "ws://127.0.0.1:9001", "--prefix", "site/1"]) == 0
    url = capsys.readouterr().out.strip()
    assert url == f"{page_path().as_uri()}?broker=ws%3A%2F%2F127.0.0.1%3A9001&prefix=site%2F1"
    assert main(["dashboard", "--ws-broker", "ws://127.0.0.1:9001", "--print"]) == 0
    assert capsys.readouterr().out.strip().endswith("prefix=offload%2Fv1")
    assert main(["dashboard", "--ws-broker", "wss://127.0.0.1:9443", "--username", "operator"]) == 0
    assert capsys.readouterr().out.strip().endswith("prefix=offload%2Fv1&username=operator")  # no password


def test_dashboard_refuses_a_bad_broker_url_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--ws-broker", "mqtt://127.0.0.1:1883"]) == 2
    error = capsys.readouterr().err.strip()
    assert "ws://host:port" in error and len(error.splitlines()) == 1


def test_dashboard_serve_serves_the_two_files_on_loopback_until_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "edge_agent", "dashboard", "--ws-broker", "ws://127.0.0.1:9001",
               "--serve", "0"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()  # printed once the port is bound
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?broker=ws%3A%2F%2F127\.0\.0\.1%3A9001"
                                r"&prefix=offload%2Fv1", url), url
            root = url.split("?")[0]
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert answer.headers["Content-Type"].startswith("text/html")
                assert answer.read() == page_path().read_bytes()
            with urllib.request.urlopen(root + "mqtt.min.js", timeout=10) as answer:
                assert answer.headers["Content-Type"].startswith("text/javascript")
                assert answer.headers["X-Content-Type-Options"] == "nosniff"
            for missing in ("__init__.py", "../cli.py", "%2e%2e/cli.py", "VENDORED.md/x"):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(root + missing, timeout=10)
                assert refused.value.code == 404
                refused.value.close()
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr


def test_the_server_listens_on_loopback_only() -> None:
    with DashboardServer() as server:
        assert server.host == "127.0.0.1" and server.url().startswith("http://127.0.0.1:")


def test_the_docs_show_a_screenshot_of_the_dashboard() -> None:
    text = Path("docs/edge-agent.md").read_text()
    assert "## Dashboard" in text and "(img/dashboard.png)" in text
    assert Path("docs/img/dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("kind", "model"), [("heartbeat", Heartbeat), ("state", NodeState),
                                             ("dead-letter", DeadLetter), ("pong", Pong)])
def test_the_pages_models_have_every_field_of_the_wire_models(kind: str, model: type[WireModel]) -> None:
    """A field added to a wire model must reach the page too, or the page would call every node
    sending it unreadable (a birth naming its tasks once did)."""
    html = page_path().read_text(encoding="utf-8")
    start = html.index("const MODELS = {")
    body = html[start:html.index("};", start)]
    key = f'"{kind}"' if "-" in kind else kind
    entry = body[body.index(f"{key}: [{{") + len(key) + 4:]
    end = re.search(r"}\s*,\s*\[", entry)
    assert end is not None, kind
    fields = entry[:end.start()]
    names = set(re.findall(r"(?:^|[{,]\s*)([a-z_]+)(?=\s*[:,]|$)", " ".join(fields.split())))
    assert set(model.model_fields) <= names, sorted(set(model.model_fields) - names)
