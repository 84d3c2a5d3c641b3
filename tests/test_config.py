from pathlib import Path

import pytest

from jasper_consumer.cli import main
from jasper_consumer.config import load_settings, parse_settings, redact_url, slugify
from jasper_consumer.errors import ConfigError

GOOD = """
amqp_url: amqp://guest:s3cr3t-amqp@127.0.0.1:5672/
communicator_types:
  - name: M2MOne NZ
    server_address: https://restapi1.jasper.com/rws/api/v1
    username: patriot-api
    api_key: ${NZ_KEY}
"""


def _raw(**ct):
    base = {"name": "M2MOne NZ", "server_address": "https://restapi1.jasper.com/rws/api/v1",
            "username": "u", "api_key": "k"}
    base.update(ct)
    return {"communicator_types": [base]}


def _problems(raw, env=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, env or {})
    return info.value.problems


def test_env_vars_are_expanded(tmp_path: Path):
    """${VAR} in the YAML is replaced from the environment."""
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    settings = load_settings(path, env={"NZ_KEY": "the-key"})
    assert settings.communicator_types[0].read_api_key() == "the-key"
    assert settings.commands[65516] == "activate"
    assert settings.communicator_types[0].slug == "m2mone-nz"


def test_missing_env_var_is_named(tmp_path: Path):
    """An undefined ${VAR} is reported with the key that uses it."""
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert any("NZ_KEY" in p and "communicator_types[0].api_key" in p
               for p in info.value.problems)


def test_env_default_is_used():
    """${VAR:-default} falls back to the default when VAR is unset."""
    settings = parse_settings(_raw(api_key="${NOPE:-fallback}"), {})
    assert settings.communicator_types[0].read_api_key() == "fallback"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("restapi1.jasper.com/rws/api/v1", "absolute http:// or https://"),
        ("ftp://restapi1.jasper.com/rws/api/v1", "absolute http:// or https://"),
        ("https://restapi1.jasper.com", "API version path"),
        ("https://restapi1.jasper.com/rws/api", "API version path"),
    ],
)
def test_bad_server_address_names_type_and_value(address: str, expected: str):
    """A server_address without a scheme or the API version path is one clear line."""
    [problem] = _problems(_raw(server_address=address))
    assert "communicator_types[0 'M2MOne NZ'].server_address" in problem
    assert expected in problem
    assert address in problem


@pytest.mark.parametrize("address", [
    "https://restapi1.jasper.com/rws/api/v1?apiKey=s3cret-in-query",
    "https://restapi1.jasper.com/rws/api/v1/?apiKey=s3cret-in-query",
    "https://restapi1.jasper.com/rws/api/v1#s3cret-in-query",
])
def test_a_server_address_with_a_query_string_is_refused(address: str):
    """A query string or fragment after the API version is one line naming the key, without
    echoing what follows the '?' (it may hold a key)."""
    [problem] = _problems(_raw(server_address=address))

    assert problem.startswith("communicator_types[0 'M2MOne NZ']")
    assert "server_address must not have a query string or a fragment" in problem
    assert "s3cret-in-query" not in problem


def test_a_username_with_a_colon_is_refused():
    """A username with ':' (HTTP Basic authentication's separator) is refused at start-up,
    naming the key, without echoing it (it may be "user:key" pasted whole)."""
    [problem] = _problems(_raw(username="patriot-api:s3cret-after-colon"))

    assert problem.startswith("communicator_types[0 'M2MOne NZ']")
    assert "username must not contain ':'" in problem
    assert "s3cret-after-colon" not in problem


def test_an_empty_commands_map_is_refused():
    """A commands map without an event code would consume nothing: refused, naming the key."""
    raw = _raw()
    raw["commands"] = {}

    assert _problems(raw) == [
        "commands: must map at least one event code to a command (with none, no event is "
        "consumed)"]


def test_trailing_slash_is_accepted():
    """A server_address ending in /v1/ is normalised without the slash."""
    settings = parse_settings(_raw(server_address="http://127.0.0.1:8081/rws/api/v1/"), {})
    assert settings.communicator_types[0].server_address == "http://127.0.0.1:8081/rws/api/v1"


def test_every_problem_is_listed_once():
    """Several problems give several lines, each naming its key."""
    raw = _raw(max_concurrency=0, requests_per_second="fast")
    raw["prefetch"] = -1
    raw["queue_prefx"] = "typo"
    problems = _problems(raw)
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    for key in ("max_concurrency", "requests_per_second", "prefetch", "queue_prefx"):
        assert key in joined


def test_key_sources_are_exclusive():
    """Exactly one of api_key and api_key_file must be set."""
    [problem] = _problems(_raw(api_key=None))
    assert "exactly one of api_key or api_key_file" in problem


def test_duplicate_slugs_are_rejected():
    """Two types whose names map to the same queue name are refused."""
    raw = _raw()
    raw["communicator_types"].append(dict(raw["communicator_types"][0], name="m2mone-nz"))
    [problem] = _problems(raw)
    assert "share the queue name" in problem


def test_secrets_never_appear_in_problems():
    """A bad amqp_url or api_key is reported without echoing the secret."""
    raw = _raw(api_key=12345678)
    raw["amqp_url"] = "http://user:topsecretpw@host/"
    joined = "\n".join(_problems(raw))
    assert "topsecretpw" not in joined
    assert "12345678" not in joined
    assert "amqp_url" in joined


def test_api_key_file_is_read_fresh(tmp_path: Path):
    """api_key_file is re-read on every call, whitespace stripped."""
    key = tmp_path / "key"
    key.write_text("first\n")
    settings = parse_settings(_raw(api_key=None, api_key_file=str(key)), {})
    ct = settings.communicator_types[0]
    assert ct.read_api_key() == "first"
    key.write_text("  second  ")
    assert ct.read_api_key() == "second"


def test_missing_api_key_file_names_the_file(tmp_path: Path):
    """An unreadable api_key_file is reported with its path."""
    settings = parse_settings(_raw(api_key=None, api_key_file=str(tmp_path / "nope")), {})
    with pytest.raises(ConfigError, match="nope"):
        settings.communicator_types[0].read_api_key()


def test_redact_url_hides_password():
    """The AMQP password is replaced in URLs shown to people."""
    assert redact_url("amqp://guest:pw@h:5672/") == "amqp://guest:***@h:5672/"
    assert redact_url("amqp://h/") == "amqp://h/"


def test_slugify():
    """Communicator type names become lower-case dashed queue-name parts."""
    assert slugify("M2MOne NZ (prod)") == "m2mone-nz-prod"


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """check-config prints each problem and exits non-zero; a good file exits 0."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("/rws/api/v1", "").replace("${NZ_KEY}", "k"))
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "server_address" in err
    assert "s3cr3t-amqp" not in err
    good = tmp_path / "good.yaml"
    good.write_text(GOOD.replace("${NZ_KEY}", "k"))
    assert main(["check-config", "--config", str(good)]) == 0
    assert "OK" in capsys.readouterr().out


def test_not_yaml_is_reported(tmp_path: Path):
    """A file that is not YAML mapping gets one line saying so."""
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path)
