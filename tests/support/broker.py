"""A real RabbitMQ broker for the queue tests: the local one (``.ci/run`` installs and starts it; started here if it
is installed but not running). Each test uses its own names, removed afterwards."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def broker_running() -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", 5672)) == 0


def ensure_broker() -> str:
    if broker_running():
        return AMQP_URL
    server = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
    assert shutil.which("rabbitmq-server") or __import__("os").path.exists(server), (
        "RabbitMQ is not installed: apt-get install rabbitmq-server (bash .ci/run does it)")
    plugins = shutil.which("rabbitmq-plugins") or "/usr/sbin/rabbitmq-plugins"
    subprocess.run([plugins, "enable", "--offline", "rabbitmq_consistent_hash_exchange"], capture_output=True)
    subprocess.run([server, "-detached"], capture_output=True)
    deadline = time.monotonic() + 60
    while not broker_running():
        assert time.monotonic() < deadline, "RabbitMQ did not start within 60 s"
        time.sleep(0.5)
    time.sleep(1.0)
    return AMQP_URL


def restart_broker() -> None:
    """Stop and start the broker application (connections drop, durable queues stay)."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "stop_app"], capture_output=True, check=True, timeout=60)
    time.sleep(1.0)
    subprocess.run([ctl, "start_app"], capture_output=True, check=True, timeout=60)
