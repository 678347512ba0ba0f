"""The package's one exception tree.

Every error knows the HTTP status and the WebSocket close code it maps to, and a short
machine-readable ``code``; handlers translate errors to responses in one place
(``error.to_json()``, ``error.http_status``). Library errors are translated at the
boundary with ``raise ... from``.

::

    PipelineError                       500  internal
    ├── ProtocolError                   400  malformed
    │   ├── MissingField                400  missing_field
    │   ├── FieldTypeError              400  bad_type
    │   ├── FieldValueError             400  bad_value
    │   ├── UnsupportedSchemaVersion    400  unsupported_schema_version
    │   ├── UnsupportedMediaType        415  unsupported_media_type
    │   ├── PayloadTooLarge             413  too_large
    │   └── RequestTimeout              408  timeout (body not received in time)
    ├── IntegrityError                  422  integrity
    │   ├── ChunkHashMismatch           422  chunk_hash_mismatch
    │   ├── EventHashMismatch           422  event_hash_mismatch
    │   └── DecompressionError          422  bad_compression
    │       └── DecompressionLimitExceeded 413 decompressed_too_large
    ├── ConflictError                   409  conflict
    │   └── SequenceConflict            409  sequence_conflict
    ├── AuthError                       401  unauthenticated (close 1008)
    │   ├── Unauthenticated             401  unauthenticated
    │   └── Forbidden                   403  forbidden
    ├── Throttled                       429  throttled
    ├── NotFound                        404  not_found
    ├── ConfigError                     —    bad_config (start-up only)
    ├── AlreadyRunning                  —    already_running (start-up only: file locked)
    ├── StoreError                      503  store_unavailable (Retry-After 5)
    │   └── StorageFull                 507  storage_full (Retry-After 10)
    └── QueueError                      500  queue_error
        ├── QueueFull                   507  queue_full
        └── EventTooLarge               413  event_too_large
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base of every error this package raises on purpose."""

    http_status: int = 500
    close_code: int = 1011
    code: str = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        """The JSON error body sent to callers: never holds secrets."""
        doc: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            doc["field"] = self.field
        return doc


class ProtocolError(PipelineError):
    http_status = 400
    close_code = 1002
    code = "malformed"


class MissingField(ProtocolError):
    code = "missing_field"


class FieldTypeError(ProtocolError):
    code = "bad_type"


class FieldValueError(ProtocolError):
    code = "bad_value"


class UnsupportedSchemaVersion(ProtocolError):
    code = "unsupported_schema_version"


class UnsupportedMediaType(ProtocolError):
    http_status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ProtocolError):
    http_status = 413
    close_code = 1009
    code = "too_large"


class RequestTimeout(ProtocolError):
    """The request body did not arrive within the read deadline (slow clients)."""

    http_status = 408
    code = "timeout"


class IntegrityError(PipelineError):
    http_status = 422
    close_code = 1007
    code = "integrity"


class ChunkHashMismatch(IntegrityError):
    code = "chunk_hash_mismatch"


class EventHashMismatch(IntegrityError):
    code = "event_hash_mismatch"


class DecompressionError(IntegrityError):
    code = "bad_compression"


class DecompressionLimitExceeded(DecompressionError):
    http_status = 413
    code = "decompressed_too_large"


class ConflictError(PipelineError):
    http_status = 409
    code = "conflict"


class SequenceConflict(ConflictError):
    code = "sequence_conflict"


class AuthError(PipelineError):
    http_status = 401
    close_code = 1008
    code = "unauthenticated"


class Unauthenticated(AuthError):
    pass


class Forbidden(AuthError):
    http_status = 403
    code = "forbidden"


class Throttled(PipelineError):
    http_status = 429
    close_code = 1013
    code = "throttled"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(PipelineError):
    http_status = 404
    code = "not_found"


class ConfigError(PipelineError):
    """Bad configuration; raised at start-up and names the offending key."""

    code = "bad_config"


class AlreadyRunning(PipelineError):
    """Another process holds the single-instance lock of a store or queue file."""

    code = "already_running"


class StoreError(PipelineError):
    http_status = 503
    close_code = 1011
    code = "store_unavailable"
    retry_after: float | None = 5.0  # sent as Retry-After: senders back off, then retry


class StorageFull(StoreError):
    http_status = 507
    code = "storage_full"
    retry_after = 10.0


class QueueError(PipelineError):
    code = "queue_error"


class QueueFull(QueueError):
    http_status = 507
    code = "queue_full"


class EventTooLarge(QueueError):
    http_status = 413
    code = "event_too_large"
