"""kombu's Redis transport, made to survive a Redis restart under a running worker.

When the broker connection drops, Celery closes the consumer's channel and opens a new one. Two
things then reach for the old channel's connection, which is gone, and fail with an
AttributeError (`'NoneType' object has no attribute 'hostname'` or `... 'client'`) that Celery
reports as an unrecoverable error, so the worker dies (kombu issues #582 and #970 show the same
path): the channel's close, which puts its held messages back on their queues, and the ack of a
task that finishes after the reconnection. Here the old channel says its connection is lost with
a connection error instead, which kombu and Celery handle (an ack that could not be sent is
logged), and its close leaves its held messages where they are, in kombu's `unacked` hash: the
visibility timeout restores them once their leases (delivery.leases) are no longer renewed, as it
does for a dead worker's.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES, redis
from redis.exceptions import ConnectionError as RedisConnectionError


def _connected(channel: redis.Channel) -> bool:
    return channel.connection is not None and getattr(channel.connection, "client", None) is not None


class Channel(redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        if not _connected(self):
            raise RedisConnectionError("this channel's broker connection was lost")
        return super()._connparams(asynchronous)

    def close(self) -> None:
        if not _connected(self):
            self.do_restore = False
        super().close()


class Transport(redis.Transport):
    Channel = Channel


def register() -> None:
    """Make this the transport of `redis://` URLs, for the workers, the API and Flower alike."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
