"""The YAML configuration as typed settings, built once at start-up and passed down.

``load_settings(path)`` reads the file, replaces ``${VAR}`` from the environment,
validates it, and raises :class:`ConfigError` with one line per problem naming the
key and the bad value. Secrets (API keys, the AMQP password, proxy credentials) are
never echoed. The environment is read here and nowhere else: a communicator type
without ``proxy`` takes ``HTTPS_PROXY`` / ``NO_PROXY`` (``HTTP_PROXY`` for an
``http://`` address) at this point. :meth:`Settings.file_problems` checks the TLS files
(CA bundles, client certificate) before anything connects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import tls
from .errors import ConfigError
from .urls import amqp_tls_files, amqp_url_problem, env_proxy, proxy_problem
from .urls import redact_url as redact_url  # re-exported: callers redact through config

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_KEYS = ("api_key", "password", "amqp_url", "proxy")


class Command(StrEnum):
    """What to do with a SIM."""

    ACTIVATE = "activate"
    DEACTIVATE = "deactivate"

    @property
    def target_status(self) -> str:
        return "ACTIVATED" if self is Command.ACTIVATE else "DEACTIVATED"

    @property
    def past_tense(self) -> str:
        return "activated" if self is Command.ACTIVATE else "deactivated"


def slugify(name: str) -> str:
    """``"M2MOne NZ"`` -> ``"m2mone-nz"``: the communicator type's part of a queue name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySettings(_Strict):
    """Retry budget for retryable Jasper errors: bounded by attempts and by time."""

    max_attempts: int = Field(5, ge=1, le=100)
    initial_delay_seconds: float = Field(0.5, gt=0)
    max_delay_seconds: float = Field(30.0, gt=0)
    max_elapsed_seconds: float = Field(120.0, gt=0)


class LaneSettings(_Strict):
    """Which jobs are *bulk* (served after interactive ones, with a guaranteed share).

    A job is bulk when its ``origin`` is in ``bulk_origins``, its command is in
    ``bulk_commands``, or the producer set the AMQP ``priority`` to 1-4; every other job
    (an operator's commission) is interactive (operator guide, section 13).
    """

    bulk_origins: list[str] = Field(default_factory=lambda: ["reconcile", "replay"])
    bulk_commands: list[Command] = Field(default_factory=lambda: [Command.DEACTIVATE])
    bulk_min_share: float = Field(0.1, ge=0.0, le=1.0)


class CommunicatorType(_Strict):
    """One Jasper Control Center account, called with its own session and limits."""

    name: str = Field(min_length=1)
    server_address: str
    username: str = Field(min_length=1)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    max_concurrency: int = Field(1, ge=1, le=64)
    requests_per_second: float = Field(1.0, gt=0, le=1000)
    request_timeout_seconds: float = Field(10.0, gt=0, le=300)
    # TLS: trust this CA bundle instead of the system's (a private CA, TLS inspection).
    ca_file: Path | None = None
    # Forward proxy (HTTP CONNECT), ``http://[user:password@]host:port``; may hold secrets.
    # Unset: HTTPS_PROXY / NO_PROXY from the environment (see ``with_env_proxies``).
    proxy: SecretStr | None = None
    _proxy_source: str = PrivateAttr("proxy")

    @field_validator("server_address")
    @classmethod
    def _check_server_address(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if not re.search(r"/v\d+/?$", parts.path):
            raise ValueError(
                "must end with the API version path, e.g. https://restapi1.jasper.com/rws/api/v1"
            )
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            problem = proxy_problem(value.get_secret_value())
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> CommunicatorType:
        if (self.api_key is None) == (self.api_key_file is None):
            raise ValueError("set exactly one of api_key or api_key_file")
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError("api_key is empty (is its ${VAR} set?)")
        return self

    @model_validator(mode="after")
    def _usable_in_a_request(self) -> CommunicatorType:
        # Checked on the whole type, so that the message does not echo the value: a query
        # string may hold a key, and so may a username pasted as "user:key".
        if urlsplit(self.server_address).query or "#" in self.server_address:
            raise ValueError("server_address must not have a query string or a fragment "
                             "('?...' or '#...'): each call adds its own path and query to it")
        if ":" in self.username:
            raise ValueError("username must not contain ':' (HTTP Basic authentication puts "
                             "one between the user name and the API key)")
        return self

    @property
    def slug(self) -> str:
        return slugify(self.name)

    @property
    def proxy_url(self) -> str | None:
        """The proxy's URL, credentials included (pass it only to the HTTP client)."""
        return self.proxy.get_secret_value() if self.proxy is not None else None

    @property
    def proxy_setting(self) -> str:
        """Where the proxy is set: ``proxy``, or the environment variable it came from."""
        return self._proxy_source

    @property
    def proxy_shown(self) -> str | None:
        """The proxy without credentials, and where it came from, for messages:
        ``http://proxy.centre.local:3128 (from HTTPS_PROXY)``."""
        if self.proxy is None:
            return None
        parts = urlsplit(self.proxy.get_secret_value())
        where = "" if self._proxy_source == "proxy" else f" (from {self._proxy_source})"
        return f"http://{parts.hostname}:{parts.port or 80}{where}"

    def read_api_key(self) -> str:
        """The API key, read afresh from ``api_key_file`` each time (a rotated secret applies)."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        assert self.api_key_file is not None
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                [f"communicator type {self.name!r}: cannot read api_key_file "
                 f"{str(self.api_key_file)!r}: {exc.strerror}"]
            ) from None
        if not key:
            raise ConfigError(
                [f"communicator type {self.name!r}: api_key_file "
                 f"{str(self.api_key_file)!r} is empty"]
            )
        return key


class Settings(_Strict):
    """Everything the service needs to know, validated."""

    # One URL, or one per node of a RabbitMQ cluster (the first that answers is used).
    amqp_url: SecretStr | list[SecretStr] = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    events_exchange: str = Field("patriot.events", min_length=1)
    history_exchange: str = Field("patriot.history", min_length=1)
    queue_prefix: str = Field("jasper-consumer", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    prefetch: int = Field(64, ge=1, le=10000)
    http_port: int = Field(8080, ge=0, le=65535)
    commands: dict[int, Command] = Field(
        default_factory=lambda: {65516: Command.ACTIVATE, 65517: Command.DEACTIVATE}
    )
    retry: RetrySettings = Field(default_factory=RetrySettings)
    lanes: LaneSettings = Field(default_factory=LaneSettings)
    history_queue: bool = True
    history_binding: str = "jasper.#"
    max_message_bytes: int = Field(65536, ge=1024)
    delivery_limit: int = Field(20, ge=1)
    work_delivery_limit: int = Field(5000, ge=1)
    shutdown_grace_seconds: float = Field(20.0, gt=0)
    # Jobs of a paused type no longer wait in the consumer's prefetch (they are parked),
    # so this key has no effect; it is still accepted so that older configs start.
    paused_prefetch: int | None = Field(None, ge=1, le=65535)
    # The longest a message is held unacked before it is renewed (below the broker's
    # consumer timeout, 30 min by default): the parked queue's anchor token.
    hold_refresh_seconds: float = Field(20 * 60.0, gt=0)
    # Outcomes remembered per communicator type (duplicates repeat them without a call).
    outcome_memory_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    watchdog_interval_seconds: float = Field(5.0, gt=0)
    communicator_types: list[CommunicatorType] = Field(min_length=1)

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(
        cls, value: SecretStr | list[SecretStr]
    ) -> SecretStr | list[SecretStr]:
        urls = value if isinstance(value, list) else [value]
        if not urls:
            raise ValueError("the list of node URLs is empty")
        for n, url in enumerate(urls, 1):
            problem = amqp_url_problem(url.get_secret_value())
            if problem is not None:
                where = f"URL {n} of {len(urls)}" if len(urls) > 1 else "it"
                raise ValueError(f"{where} {problem}")
        return value

    @model_validator(mode="after")
    def _unique_types(self) -> Settings:
        seen: dict[str, str] = {}
        for ct in self.communicator_types:
            if ct.slug in seen:
                raise ValueError(
                    f"communicator types {seen[ct.slug]!r} and {ct.name!r} share the queue "
                    f"name {ct.slug!r}; give them distinctive names"
                )
            seen[ct.slug] = ct.name
        return self

    @field_validator("commands")
    @classmethod
    def _some_command(cls, value: dict[int, Command]) -> dict[int, Command]:
        if not value:
            raise ValueError("must map at least one event code to a command (with none, no "
                             "event is consumed)")
        return value

    @cached_property
    def type_names(self) -> frozenset[str]:
        return frozenset(ct.name for ct in self.communicator_types)

    def communicator(self, name: str) -> CommunicatorType | None:
        for ct in self.communicator_types:
            if ct.name == name:
                return ct
        return None

    @property
    def amqp_urls(self) -> list[str]:
        """Every node's URL, secrets included (pass them only to the AMQP client)."""
        urls = self.amqp_url if isinstance(self.amqp_url, list) else [self.amqp_url]
        return [url.get_secret_value() for url in urls]

    @property
    def amqp_url_redacted(self) -> str:
        return ", ".join(redact_url(url) for url in self.amqp_urls)

    def file_problems(self) -> list[str]:
        """What is wrong with the TLS files the config names (``cafile``, ``certfile``,
        ``keyfile`` of ``amqp_url``; each type's ``ca_file``): one line each, empty when
        all load. Checked at start-up and by ``check-config``, before anything connects."""
        problems = []
        for n, url in enumerate(self.amqp_urls, 1):
            where = f"amqp_url (URL {n})" if len(self.amqp_urls) > 1 else "amqp_url"
            problems += tls.file_problems(where, *amqp_tls_files(url))
        for n, ct in enumerate(self.communicator_types):
            if ct.ca_file is not None:
                problems += tls.file_problems(
                    f"communicator_types[{n} {ct.name!r}].ca_file", ct.ca_file)
        return list(dict.fromkeys(problems))


def with_env_proxies(settings: Settings, env: Mapping[str, str],
                     problems: list[str]) -> Settings:
    """Each type without ``proxy`` gets the environment's (``HTTPS_PROXY``, ``NO_PROXY``);
    a malformed one is a problem naming the variable, never its value."""
    types = []
    for ct in settings.communicator_types:
        found = env_proxy(ct.server_address, env) if ct.proxy is None else None
        if found is None:
            types.append(ct)
            continue
        url, variable = found
        problem = proxy_problem(url)
        if problem is not None:
            problems.append(f"environment variable {variable} (proxy of {ct.name!r}): {problem}")
            types.append(ct)
            continue
        copy = ct.model_copy(update={"proxy": SecretStr(url)})
        copy._proxy_source = variable
        types.append(copy)
    return settings.model_copy(update={"communicator_types": types})


def expand_env(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` (or ``${VAR:-default}``) in every string of a YAML tree.

    An undefined variable without a default is a problem noted in ``problems``.
    """
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name not in env:
                if default is not None:
                    return default
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return env[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k), problems)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _location(loc: tuple[int | str, ...], raw: Any) -> str:
    """A pydantic error location as a key path naming the communicator type.

    ``('communicator_types', 0, 'server_address')`` becomes
    ``communicator_types[0 'M2MOne NZ'].server_address``.
    """
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            if isinstance(node, list) and part < len(node) and isinstance(node[part], dict):
                name = node[part].get("name")
                if isinstance(name, str):
                    label = f"[{part} {name!r}]"
            out += label
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def format_validation_error(exc: ValidationError, raw: Any) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        where = _location(loc, raw)
        msg = err["msg"].removeprefix("Value error, ")
        secret = any(any(s in str(p) for s in _SECRET_KEYS) for p in loc)
        given = err.get("input")
        scalar = given is None or isinstance(given, bool | int | float | str)
        if (err["type"] in ("missing", "extra_forbidden") or secret or "input" not in err
                or not scalar):  # a mapping or list may hold secrets: never echo one
            value = ""
        else:
            value = f" (got {err['input']!r})"
            if len(value) > 120:
                value = value[:117] + "...)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        problems.append(f"{where}: {msg}{value}")
    return problems


def parse_settings(raw: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Validate an already parsed YAML tree (env expansion included)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): the config must be a YAML mapping of keys to values"])
    expanded = expand_env(raw, os.environ if env is None else env, "", problems)
    try:
        settings = Settings.model_validate(expanded)
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, raw))
        raise ConfigError(problems) from None
    settings = with_env_proxies(settings, os.environ if env is None else env, problems)
    if problems:
        raise ConfigError(problems)
    return settings


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, expand and validate the YAML config file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the problem and the position: the offending line may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    return parse_settings(raw, env)
