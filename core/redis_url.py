"""Connecting to the broker: checking a redis:// or rediss:// URL, TLS settings from its query, redacting its
password for messages, one PING that says in a line why it fails, and the client itsd's records use."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from core.errors import BrokerAuthError, BrokerUnreachable, InvalidParameters


def check_broker_url(url: str | None) -> str:
    if not url:
        raise InvalidParameters("no broker: pass --broker redis://[:PASSWORD@]HOST:PORT/DB or set ITSD_BROKER_URL")
    if urlsplit(url).scheme not in ("redis", "rediss"):
        raise InvalidParameters(f"broker URL must start with redis:// or rediss://, got {redact(url)}")
    return url


def check_connection(url: str, timeout: float) -> None:
    """One PING within `timeout` seconds, or a BrokerUnreachable saying why in one line (never the password):
    so a wrong password or a closed port is an error in seconds, not a minute of retries or a silent hang."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    where = redact(url)
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError) as exc:
        if urlsplit(url).password is None and "auth" in str(exc).lower():  # NOAUTH, or HELLO without AUTH
            raise BrokerAuthError(
                f"Redis at {where} needs a password: put it in the URL, redis://:PASSWORD@HOST:PORT/DB"
            ) from None
        if isinstance(exc, redis.exceptions.AuthenticationError) or "WRONGPASS" in str(exc):
            raise BrokerAuthError(f"Redis at {where} refused the password") from None
        raise BrokerUnreachable(f"Redis at {where}: {str(exc).splitlines()[0]}") from None
    except redis.exceptions.TimeoutError:
        raise BrokerUnreachable(
            f"Redis at {where} did not answer within {timeout:g} s (ITSD_CONNECT_TIMEOUT)"
        ) from None
    except redis.exceptions.ConnectionError as exc:
        raise BrokerUnreachable(f"cannot connect to Redis at {where}: {str(exc).splitlines()[0]}") from None
    finally:
        client.close()


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}

_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def tls_options(url: str) -> dict[str, Any] | None:
    """TLS settings for Celery from a rediss:// URL's query (redis-py reads the same query itself):
    `ssl_cert_reqs=required|optional|none` (default required: certificates are checked), and
    `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` paths. None for plain redis://."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise InvalidParameters(f"ssl_cert_reqs must be required, optional or none, got {query['ssl_cert_reqs']!r}")
    return {"ssl_cert_reqs": _CERT_REQS[reqs], **{key: query[key] for key in _TLS_FILES if key in query}}


def redis_client(url: str, retries: int = 20, timeout: float = 30.0) -> Any:
    """A redis-py client for itsd's own records that rides out a Redis restart (retries with backoff for
    about a minute). With `retries=0` and a short `timeout` it raises within seconds instead, for whoever
    must say that Redis is away (`itsd submit --wait`). redis is imported here, not at module level: core
    stays free of it."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_keepalive=True,
        socket_connect_timeout=min(5.0, timeout),
        socket_timeout=timeout,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=4.0, base=0.25), retries=retries),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
