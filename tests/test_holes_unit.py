"""The holes of issue 9 that need no broker: the CLI as a subprocess, and the log formatter."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jasper_consumer.log import JsonFormatter

from .reliability.conftest import Proc, free_port, wait_until

PASSWORD = "S3cretPassw0rd"
KEY = "K3ySecretValue"
ENV_KEY = "EnvSecretV4lue"
FILE_KEY = "FileSecretV4lue"
SIM_URL = "http://127.0.0.1:9/rws/api/v1"


def jasper_consumer(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the CLI; (exit code, stdout and stderr together)."""
    done = subprocess.run([sys.executable, "-m", "jasper_consumer", *args],
                          capture_output=True, text=True, timeout=60,
                          env=None if env is None else {**os.environ, **env})
    return done.returncode, done.stdout + done.stderr


def test_hole6a_queue_name_collision_does_not_echo_the_amqp_password(tmp_path: Path):
    """A queue-name collision fails check-config, naming both types, without the password."""
    config = tmp_path / "config.yaml"
    # amqp_url first: a message that echoes the config's values shows it first.
    config.write_text(f"""\
amqp_url: amqp://guest:{PASSWORD}@127.0.0.1:5672/
communicator_types:
  - {{name: Type A, server_address: "{SIM_URL}", username: a, api_key: ka}}
  - {{name: type-a, server_address: "{SIM_URL}", username: b, api_key: kb}}
""")
    code, output = jasper_consumer("check-config", "--config", str(config))

    print(f"hole 6a: exit {code}; output: {output.strip()!r}")
    assert code != 0, output
    assert "Type A" in output, output
    assert "type-a" in output, output
    assert PASSWORD not in output, f"the password is in the output: {output}"


@pytest.mark.parametrize(("api_key", "env"), [(KEY, {}), ("${JC_HOLE6_KEY}",
                                                          {"JC_HOLE6_KEY": ENV_KEY})],
                         ids=["literal", "from-env"])
def test_hole6b_two_key_sources_do_not_echo_the_key(tmp_path: Path, api_key: str,
                                                    env: dict[str, str]):
    """Both api_key and api_key_file fail check-config without printing the key.

    Neither the literal key, nor one expanded from ${VAR}, nor the file's content.
    """
    key_file = tmp_path / "a.key"
    key_file.write_text(FILE_KEY)
    config = tmp_path / "config.yaml"
    # The key right after the name: a message that echoes the type's values shows it early.
    config.write_text(f"""\
amqp_url: amqp://guest:guest@127.0.0.1:5672/
communicator_types:
  - name: Type A
    api_key: "{api_key}"
    api_key_file: {key_file}
    server_address: "{SIM_URL}"
    username: a
""")
    code, output = jasper_consumer("check-config", "--config", str(config), env=env)

    print(f"hole 6b ({api_key}): exit {code}; output: {output.strip()!r}")
    assert code != 0, output
    assert "api_key" in output, output
    leaked = [s for s in (KEY, ENV_KEY, FILE_KEY) if s in output]
    assert not leaked, f"{leaked} in the output: {output}"


async def test_hole7_sigterm_while_the_broker_is_unreachable_exits_0(tmp_path: Path):
    """Started with RabbitMQ unreachable, the service exits 0 within 10 s of SIGTERM."""
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
amqp_url: amqp://guest:guest@127.0.0.1:{free_port()}/
http_port: 0
communicator_types:
  - {{name: Type A, server_address: "{SIM_URL}", username: a, api_key: ka,
      request_timeout_seconds: 2}}
""")
    service = Proc([sys.executable, "-m", "jasper_consumer", "run", "--config", str(config)],
                   tmp_path / "service.log")
    try:
        retrying = re.compile(r"retry|reconnect|does not answer|unreachable", re.IGNORECASE)
        await wait_until(lambda: bool(retrying.search(service.output())) or not service.alive,
                         "the log to show it retrying the broker", 30)
        assert service.alive, f"exited {service.popen.returncode} before SIGTERM: " \
            f"{service.output()[-2000:]}"
        service.popen.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await wait_until(lambda: not service.alive, "exit after SIGTERM", 10, 0.05)
        took = time.monotonic() - sent
        print(f"hole 7: broker unreachable, SIGTERM -> exit {service.popen.returncode} "
              f"after {took:.2f} s")
    except AssertionError as exc:
        state = "still running" if service.alive else f"exited {service.popen.returncode}"
        print(f"hole 7: broker unreachable, SIGTERM -> {state}: {exc}")
        raise AssertionError(f"{exc}; {state}; log: {service.output()[-1500:]}") from None
    finally:
        service.close()
    assert service.popen.returncode == 0, service.output()[-2000:]


def test_hole10c_json_formatter_keeps_the_traceback():
    """A record logged with log.exception() carries the traceback, with the raising line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.holes.traceback")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        raise ValueError("boom 42")  # the raising line, expected in the traceback
    except ValueError:
        logger.exception("the call failed")
    finally:
        logger.removeHandler(handler)

    data = json.loads(stream.getvalue())
    traceback = str(data.get("traceback", ""))
    print(f"hole 10c: JSON keys {sorted(data)}; traceback {len(traceback)} characters")
    assert "Traceback (most recent call last)" in traceback, f"no traceback in {data}"
    assert 'raise ValueError("boom 42")' in traceback, f"no raising line in {data}"
