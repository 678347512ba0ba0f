from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Chunk(_message.Message):
    __slots__ = ("schema_version", "sensor_id", "event_id", "sequence", "chunk_index", "chunk_count", "compression", "payload", "chunk_sha256", "event_sha256", "created_at", "logical_timestamp_ms", "clock_skew_ms", "attributes", "queue_epoch")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    EVENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    schema_version: str
    sensor_id: str
    event_id: str
    sequence: int
    chunk_index: int
    chunk_count: int
    compression: str
    payload: bytes
    chunk_sha256: bytes
    event_sha256: bytes
    created_at: str
    logical_timestamp_ms: int
    clock_skew_ms: float
    attributes: _containers.ScalarMap[str, str]
    queue_epoch: str
    def __init__(self, schema_version: _Optional[str] = ..., sensor_id: _Optional[str] = ..., event_id: _Optional[str] = ..., sequence: _Optional[int] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., compression: _Optional[str] = ..., payload: _Optional[bytes] = ..., chunk_sha256: _Optional[bytes] = ..., event_sha256: _Optional[bytes] = ..., created_at: _Optional[str] = ..., logical_timestamp_ms: _Optional[int] = ..., clock_skew_ms: _Optional[float] = ..., attributes: _Optional[_Mapping[str, str]] = ..., queue_epoch: _Optional[str] = ...) -> None: ...

class ChunkBatch(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class ChunkBatchFrames(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, chunks: _Optional[_Iterable[bytes]] = ...) -> None: ...

class IngestResult(_message.Message):
    __slots__ = ("stored", "duplicate", "sequence", "event_id", "sensor_id", "event_complete", "last_committed_sequence", "error_code", "error_message", "error_field")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    duplicate: bool
    sequence: int
    event_id: str
    sensor_id: str
    event_complete: bool
    last_committed_sequence: int
    error_code: str
    error_message: str
    error_field: str
    def __init__(self, stored: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., sequence: _Optional[int] = ..., event_id: _Optional[str] = ..., sensor_id: _Optional[str] = ..., event_complete: _Optional[bool] = ..., last_committed_sequence: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., error_field: _Optional[str] = ...) -> None: ...

class IngestBatchResult(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IngestResult]
    def __init__(self, results: _Optional[_Iterable[_Union[IngestResult, _Mapping]]] = ...) -> None: ...
