"""URLs that hold secrets (``amqp_url``, ``proxy``): validation without echo, redaction
that is safe for any string, the TLS files, and the proxy the environment gives."""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from jasper_consumer.cli import main
from jasper_consumer.config import parse_settings, redact_url
from jasper_consumer.errors import ConfigError

from .pki import Pki, pki  # noqa: F401  (the fixture)

SIM = "https://api.jasper.example/rws/api/v1"
PASSWORD = "Pw-0f-the-test"


def raw(amqp_url: Any = "amqp://guest:guest@127.0.0.1:5672/", **ct: Any) -> dict[str, Any]:
    return {"amqp_url": amqp_url, "communicator_types": [
        {"name": "M2MOne NZ", "server_address": SIM, "username": "u", "api_key": "k", **ct}]}


def problems(config: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        parse_settings(config, env or {})
    return failed.value.problems


@pytest.mark.parametrize("char", ["#", "/", "?"])
def test_password_with_an_unencoded_delimiter_is_a_config_error(char: str):
    """A password holding an unencoded '#', '/' or '?' is refused, and not shown."""
    secret = f"pa{char}ss-{PASSWORD}"
    found = problems(raw(f"amqp://jasper:{secret}@rabbit.local:5672/"))

    print(found)
    assert len(found) == 1
    assert found[0].startswith("amqp_url: it has an '@' after the host: a user name or "
                               "password holding '/', '?' or '#' must have them percent-encoded")
    assert PASSWORD not in found[0]


def test_percent_encoded_delimiters_are_accepted():
    """The same password, percent-encoded, is a valid URL."""
    settings = parse_settings(raw("amqp://jasper:pa%23s%2Fs%3F@rabbit.local:5672/"), {})

    assert settings.amqp_url_redacted == "amqp://jasper:***@rabbit.local:5672/"


@pytest.mark.parametrize("port", ["65536", "99999", "0", "56x"])
def test_a_port_out_of_range_fails_check_config(tmp_path: Path, port: str):
    """check-config exits 2 naming the port problem, for a port run could not use."""
    config = tmp_path / "config.yaml"
    config.write_text(f"amqp_url: amqp://guest:{PASSWORD}@127.0.0.1:{port}/\n"
                      "communicator_types:\n"
                      f"  - {{name: A, server_address: '{SIM}', username: a, api_key: k}}\n")
    err = io.StringIO()
    with redirect_stderr(err):
        status = main(["check-config", "--config", str(config)])

    print(err.getvalue())
    assert status == 2
    assert "amqp_url: it has a port that is not a number from 1 to 65535" in err.getvalue()
    assert PASSWORD not in err.getvalue()


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://u:p@h:5672/?cafile=/ca.pem",
     "amqp_url: it has cafile with amqp://, which is plain text: use amqps:// (port 5671 by "
     "default)"),
    ("amqps://u:p@h/?no_verify_ssl=1",
     "amqp_url: it has no_verify_ssl, which is not allowed: the broker's certificate is "
     "always verified (name its CA with cafile)"),
    ("amqps://u:p@h/?keyfile=/k.pem",
     "amqp_url: it has keyfile without certfile: name the client certificate with certfile"),
])
def test_tls_options_that_would_not_be_verified_tls_are_refused(url: str, expected: str):
    """TLS options on a plain URL, turning verification off, or a key without its
    certificate are config errors."""
    assert problems(raw(url)) == [expected]


def test_a_node_of_a_list_is_named_by_its_position():
    """In a list of nodes, the problem names which URL it is (never the URL itself)."""
    found = problems(raw([
        "amqp://u:p@h1:5672/", f"amqp://u:{PASSWORD}#@h2:5672/"]))

    assert found[0].startswith("amqp_url: URL 2 of 2 has an '@' after the host")
    assert PASSWORD not in found[0]


@given(password=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                        min_size=6, max_size=30),
       query=st.sampled_from(["", "?cafile=/etc/ca.pem", "?heartbeat=30"]))
def test_redact_url_never_shows_the_password(password: str, query: str):
    """Whatever the password holds, encoded or not, the redacted URL does not show it."""
    assume(password not in f"amqps://jasper:@rabbit.local:5671/{query}")
    url = f"amqps://jasper:{password}@rabbit.local:5671/{query}"

    assert password not in redact_url(url)


def test_missing_tls_files_are_named(tmp_path: Path):
    """cafile, certfile and keyfile that do not exist are named, each with its key."""
    url = (f"amqps://u:p@h/?cafile={tmp_path}/ca.pem&certfile={tmp_path}/c.pem"
           f"&keyfile={tmp_path}/c.key")
    settings = parse_settings(raw(url, ca_file=str(tmp_path / "jasper-ca.pem")), {})

    assert settings.file_problems() == [
        f"amqp_url: cafile '{tmp_path}/ca.pem' does not exist or is not a file",
        f"amqp_url: certfile '{tmp_path}/c.pem' does not exist or is not a file",
        f"amqp_url: keyfile '{tmp_path}/c.key' does not exist or is not a file",
        f"communicator_types[0 'M2MOne NZ'].ca_file: cafile '{tmp_path}/jasper-ca.pem' does "
        "not exist or is not a file",
    ]


def test_a_key_that_is_not_the_certificates_is_named(pki: Pki):  # noqa: F811
    """A client key that does not belong to the certificate is a clear problem."""
    url = f"amqps://u:p@h/?cafile={pki.ca}&certfile={pki.client_cert}&keyfile={pki.server_key}"

    assert parse_settings(raw(url), {}).file_problems() == [
        "amqp_url: certfile/keyfile cannot be used: the key is not the certificate's"]


def test_a_ca_file_that_is_not_pem_is_named(tmp_path: Path):
    """A ca_file without a certificate in it is a clear problem."""
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")

    found = parse_settings(raw(ca_file=str(bogus)), {}).file_problems()

    assert len(found) == 1
    assert found[0].startswith(f"communicator_types[0 'M2MOne NZ'].ca_file: cafile '{bogus}' "
                               "holds no usable CA certificate (PEM expected)")


# --- the proxy ------------------------------------------------------------------------------


def test_the_environment_gives_the_proxy_when_none_is_set():
    """Without ``proxy``, HTTPS_PROXY applies, and the messages say where it came from."""
    settings = parse_settings(raw(), {"HTTPS_PROXY": f"http://alice:{PASSWORD}@proxy:3128"})
    ct = settings.communicator_types[0]

    assert ct.proxy_url == f"http://alice:{PASSWORD}@proxy:3128"
    assert ct.proxy_shown == "http://proxy:3128 (from HTTPS_PROXY)"


@pytest.mark.parametrize("no_proxy", ["api.jasper.example", ".jasper.example", "jasper.example",
                                      "*", "localhost, api.jasper.example:443"])
def test_no_proxy_keeps_a_host_off_the_proxy(no_proxy: str):
    """NO_PROXY naming the host, a parent domain, or '*' leaves the type without a proxy."""
    settings = parse_settings(raw(), {"https_proxy": "proxy:3128", "NO_PROXY": no_proxy})

    assert settings.communicator_types[0].proxy is None


def test_a_configured_proxy_wins_over_the_environment():
    """``proxy`` in the config is used whatever HTTPS_PROXY says."""
    settings = parse_settings(raw(proxy="http://centre-proxy:8080"),
                              {"HTTPS_PROXY": "http://other:3128"})

    assert settings.communicator_types[0].proxy_shown == "http://centre-proxy:8080"


@pytest.mark.parametrize(("proxy", "expected"), [
    (f"https://alice:{PASSWORD}@proxy:3128", "must be an http://host:port URL (HTTP CONNECT "
                                             "proxy)"),
    (f"http://alice:{PASSWORD}@proxy:99999", "has a port that is not a number from 1 to 65535"),
    (f"http://alice:{PASSWORD}/x@proxy:3128", "has an '@' after the host"),
    ("http://proxy:3128/path", "must be an http://host:port URL, without a path"),
])
def test_a_bad_proxy_is_named_without_its_credentials(proxy: str, expected: str):
    """A proxy URL that cannot be used is refused; its credentials are never shown."""
    found = problems(raw(proxy=proxy))

    assert len(found) == 1
    assert found[0].startswith(f"communicator_types[0 'M2MOne NZ'].proxy: {expected}")
    assert PASSWORD not in found[0]


def test_a_bad_proxy_from_the_environment_names_the_variable():
    """A malformed HTTPS_PROXY is a problem naming the variable, never its value."""
    found = problems(raw(), {"HTTPS_PROXY": f"https://alice:{PASSWORD}@proxy:3128"})

    assert found == ["environment variable HTTPS_PROXY (proxy of 'M2MOne NZ'): must be an "
                     "http://host:port URL (HTTP CONNECT proxy)"]
