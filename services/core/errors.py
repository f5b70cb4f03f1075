"""Exceptions raised by edgecollab's own code.

EdgecollabError
├── BadInput            input we refuse; carries the `Error` code to answer with
├── DeadlineExceeded    a request got no answer before its deadline
├── RemoteError         the peer answered with an `Error` message
├── PeerGone            the peer went offline before answering
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


class ConfigError(EdgecollabError):
    """Settings or files that cannot work."""
