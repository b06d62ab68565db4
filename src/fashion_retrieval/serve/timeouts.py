"""uvicorn's HTTP/1.1 protocol (h11) with deadlines on what a client owes the server.

uvicorn (0.3x, h11) times out only an idle kept-alive connection: a client that connects and
sends nothing, or sends its request headers or body a byte at a time, holds its connection, and
with it a place under ``limit_concurrency``, for as long as it likes (1,000 such connections
were held 30 s without a sign of closing). This protocol closes a connection

- whose request headers are not complete ``header_timeout`` seconds after it opened, or, on a
  kept-alive connection, after the next request's first byte arrived;
- whose request body is not complete ``body_timeout`` seconds after its headers were.

A request that has not been answered yet gets ``408 Request Timeout`` first. Time the server
itself takes (a search queued behind others for the model) is not limited here.
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_BODY = b'{"detail": "request not received in time"}'
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


def timed_h11(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn's ``http=``) with these two deadlines, in seconds."""

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._stage: str | None = None
            self._deadline: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm("headers", header_timeout)  # a client that never sends anything

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow(data_arrived=True)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow(data_arrived=False)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow(self, data_arrived: bool) -> None:
            """Arm the deadline of what the client is in the middle of sending, once per stage."""
            state = self.conn.their_state
            if state is h11.IDLE:
                # between requests an idle connection is uvicorn's keep-alive timer's business;
                # the next request's deadline starts with its first byte
                if data_arrived:
                    self._arm("headers", header_timeout)
                else:
                    self._disarm()
            elif state is h11.SEND_BODY:
                self._arm("body", body_timeout)
            else:
                self._disarm()

        def _arm(self, stage: str, seconds: float) -> None:
            if self._stage == stage and self._deadline is not None:
                return  # the deadline runs from the start of the stage, not from the last byte
            self._disarm()
            self._stage = stage
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = None
            self._stage = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            self.logger.info("closing a connection whose request %s did not arrive in time", self._stage)
            if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
                self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return TimedH11Protocol
