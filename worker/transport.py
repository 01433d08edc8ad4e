"""kombu's Redis transport, except that a queue entry which is not a kombu message cannot stop the worker.

Anyone who can reach Redis can `LPUSH itsd.<model> 'not json'`. kombu decodes each entry in the worker's
event loop, and a decoding error there is unrecoverable: the worker and its pool exit. This channel lets
kombu decode as usual; an entry that fails (not JSON, or JSON that is no message envelope) goes to the
dead-letter list with its raw text and the reason, and the worker reads the next one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty

from core.errors import SchemaError
from core.records import dead_letter

log = logging.getLogger(__name__)
RAW_LIMIT = 2000  # characters of a bad entry kept in its dead letter


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return super()._brpop_read(**options)
        except (ValueError, TypeError, KeyError) as exc:  # not JSON (a ValueError), or JSON but no envelope
            self._dead_letter(exc)
            raise Empty() from None

    def _get(self, queue: str) -> Any:
        try:
            message = super()._get(queue)
        except (ValueError, TypeError) as exc:
            self._dead_letter(exc)
            raise Empty() from None
        if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
            self._dead_letter(TypeError(type(message).__name__), message)
            raise Empty()
        return message

    def _dead_letter(self, exc: BaseException, raw: Any = None) -> None:
        text = getattr(exc, "doc", None) if raw is None else json.dumps(raw)
        reason = f"not JSON: {exc}" if hasattr(exc, "doc") else f"JSON, but no message envelope ({exc!r})"
        job = {"raw": None if text is None else str(text)[:RAW_LIMIT]}
        with self.conn_or_acquire() as client:
            dead_letter(client, job, SchemaError.code, f"queue entry is not a message: {reason}")
        log.error("dead-lettered a queue entry that is not a message: %s", reason)


class Transport(kombu_redis.Transport):
    Channel = Channel
