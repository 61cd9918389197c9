"""kombu's Redis transport, made to survive a Redis restart under a running worker.

When the broker connection drops, Celery closes the consumer's channel, and kombu then tries to
put the channel's held messages back on their queues through a connection that is already gone:
it fails with `AttributeError: 'NoneType' object has no attribute 'hostname'`, which Celery
reports as an unrecoverable error, and the worker dies (kombu issues #582, #970 show the same
path). Here a channel closed without a connection leaves its held messages where they are, in
kombu's `unacked` hash: the visibility timeout restores them once their leases (delivery.leases)
are no longer renewed, as it does for a dead worker's.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES, redis


class Channel(redis.Channel):
    def close(self) -> None:
        if self.connection is None or getattr(self.connection, "client", None) is None:
            self.do_restore = False
        super().close()


class Transport(redis.Transport):
    Channel = Channel


def register() -> None:
    """Make this the transport of `redis://` URLs, for the workers, the API and Flower alike."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
