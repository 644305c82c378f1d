"""One rooted error hierarchy. Retryability lives on the type, never on a guess at the call site."""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.redaction import redacted_url


class ToolswarmError(Exception):
    """Root of every error toolswarm raises on purpose."""

    retryable: bool = False
    error_type: str = "toolswarm_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- user input and configuration: reported once, nothing enqueued -------------------------


class ConfigError(ToolswarmError):
    """The configuration file or an environment override is invalid."""

    error_type = "config_error"


class JobSpecError(ToolswarmError):
    """A submitted job (items file, item, server name) is invalid."""

    error_type = "job_spec_error"


class JobNotFound(ToolswarmError):
    error_type = "job_not_found"


class JobRunning(ToolswarmError):
    """An operation that needs an ended job (delete) was asked of one still pending or running."""

    error_type = "job_running"


class InvalidSessionId(ToolswarmError):
    """A session id that is not a UUID: refused before it can name a key or a file."""

    error_type = "invalid_session_id"
    MAX_SHOWN = 60  # characters of the bad id's repr the message shows

    def __init__(self, session_id: object) -> None:
        shown = repr(session_id)
        if len(shown) > self.MAX_SHOWN:
            shown = f"{shown[: self.MAX_SHOWN]}... ({len(shown)} chars)"
        super().__init__(f"invalid session id {shown}: expected a UUID (8-4-4-4-12 hex digits)")
        self.shown = shown


class RedisUnavailable(ToolswarmError):
    """Redis (state store or broker) cannot be reached; the message names the URL."""

    error_type = "redis_unavailable"
    retryable = True


class RedisAuthFailed(RedisUnavailable):
    """Redis (state store or broker) refused the credentials of its URL: no retry helps."""

    error_type = "redis_auth_failed"
    retryable = False

    @classmethod
    def at(cls, what: str, url: str, reason: object) -> RedisAuthFailed:
        """The error for ``what`` ("Redis", "the broker") at ``url``, shown without its secret."""
        shown = redacted_url(url)
        if urlsplit(url).password is None:
            return cls(f"{what} at {shown} asks for a password and the URL has none: {reason}")
        return cls(f"{what} at {shown} refused the URL's credentials: {reason}")


# --- outcomes of one tool call ----------------------------------------------------------------


class TransientError(ToolswarmError):
    """Worth retrying: the same call may succeed later."""

    retryable = True
    error_type = "transient_error"


class CallTimeout(TransientError):
    error_type = "timeout"


class ServerUnavailable(TransientError):
    """The MCP server could not be reached or its session broke."""

    error_type = "server_unavailable"


class ServerError(TransientError):
    """The server answered with a JSON-RPC error classified as transient (e.g. internal error)."""

    error_type = "server_error"


class RetryableToolError(TransientError):
    """The tool reported an error and its server marks tool errors retryable."""

    error_type = "tool_error"


class PermanentError(ToolswarmError):
    """Retrying the same call cannot help."""

    retryable = False
    error_type = "permanent_error"


class UnknownTool(PermanentError):
    error_type = "unknown_tool"


class InvalidArguments(PermanentError):
    """A pipeline step's arguments, once its references were resolved, do not fit the tool's schema."""

    error_type = "invalid_arguments"


class ToolFailed(PermanentError):
    """The tool ran and reported an error (``is_error`` result)."""

    error_type = "tool_error"


class ProtocolError(PermanentError):
    """The server answered with a JSON-RPC error that is not transient (e.g. invalid params)."""

    error_type = "protocol_error"


class AuthFailed(PermanentError):
    """The server refused the credentials (HTTP 401 or 403) and nothing toolswarm holds can fix it."""

    error_type = "auth_error"


class ServerDown(PermanentError):
    """The server's probes kept failing for longer than its hold budget (``hold_timeout_s``): its
    items fail instead of waiting for it forever."""

    error_type = "server_unavailable"


class RetriesExhausted(ToolswarmError):
    """A transient failure kept happening until the attempt budget ran out.

    Not retried any more, but retryable: the cause was transient, so resubmitting may succeed.
    """

    retryable = True

    error_type = "retries_exhausted"


class ConflictError(ToolswarmError):
    """A compare-and-swap update kept losing the race until its retry budget ran out."""

    error_type = "conflict"
    retryable = True

    def __init__(self, key: str, attempts: int, last_version: int) -> None:
        super().__init__(f"update of {key!r} conflicted {attempts} times (last version seen: {last_version})")
        self.key = key
        self.attempts = attempts
        self.last_version = last_version


# --- handoffs between servers (see shared/handoff.py) --------------------------------------------


class HandoffRefused(PermanentError):
    """A handoff envelope that the receiver must not act on."""

    error_type = "handoff_refused"


class HandoffMisdelivered(HandoffRefused):
    error_type = "handoff_misdelivered"


class HandoffExpired(HandoffRefused):
    error_type = "handoff_expired"
