"""Exceptions raised by edgecollab's own code.

EdgecollabError
├── BadInput            input we refuse; carries the `Error` code to answer with
├── DeadlineExceeded    a request got no answer before its deadline
├── RemoteError         the peer answered with an `Error` message
├── PeerGone            the peer went offline before answering
│   └── NoSubscriber    nobody was subscribed to the request's topic (PUBACK reason 0x10)
└── ConfigError         settings or files that cannot work; a clear start-up failure
"""

from __future__ import annotations

from schemas import Error
from schemas.messages import ErrorCode


class EdgecollabError(Exception):
    """Base of every edgecollab exception."""


class BadInput(EdgecollabError):
    """Input we refuse; `code` is the `Error` code sent back."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


class DeadlineExceeded(EdgecollabError):
    """No answer arrived before the request's deadline."""


class RemoteError(EdgecollabError):
    """The peer answered with an `Error`."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.service}: {error.code}: {error.message}")
        self.error = error


class PeerGone(EdgecollabError):
    """The agent a request was sent to went offline before answering."""


class NoSubscriber(PeerGone):
    """The broker had no subscriber for the request's topic (MQTT 5 PUBACK 0x10): no
    orchestrator, or a worker that is gone. Nobody will answer; the requester may retry."""


class NotAuthorized(EdgecollabError):
    """The broker refused a request (MQTT 5 PUBACK 0x87): this account may not publish there
    (the ACL made from its role). Retrying will not help."""


class ConfigError(EdgecollabError):
    """Settings or files that cannot work."""
