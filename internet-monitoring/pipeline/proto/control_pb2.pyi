from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Heartbeat(_message.Message):
    __slots__ = ("software_version", "last_committed_sequence", "queue_depth", "clock_skew_ms", "retry_total", "dropped_total", "quarantined_total")
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    RETRY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    software_version: str
    last_committed_sequence: int
    queue_depth: int
    clock_skew_ms: float
    retry_total: int
    dropped_total: int
    quarantined_total: int
    def __init__(self, software_version: _Optional[str] = ..., last_committed_sequence: _Optional[int] = ..., queue_depth: _Optional[int] = ..., clock_skew_ms: _Optional[float] = ..., retry_total: _Optional[int] = ..., dropped_total: _Optional[int] = ..., quarantined_total: _Optional[int] = ...) -> None: ...

class ChunkRequest(_message.Message):
    __slots__ = ("since_sequence", "max_chunks", "max_bytes", "window_id", "max_in_flight")
    SINCE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    since_sequence: int
    max_chunks: int
    max_bytes: int
    window_id: str
    max_in_flight: int
    def __init__(self, since_sequence: _Optional[int] = ..., max_chunks: _Optional[int] = ..., max_bytes: _Optional[int] = ..., window_id: _Optional[str] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class ChunkAck(_message.Message):
    __slots__ = ("window_id", "committed_sequences", "reset_window")
    WINDOW_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RESET_WINDOW_FIELD_NUMBER: _ClassVar[int]
    window_id: str
    committed_sequences: _containers.RepeatedScalarFieldContainer[int]
    reset_window: bool
    def __init__(self, window_id: _Optional[str] = ..., committed_sequences: _Optional[_Iterable[int]] = ..., reset_window: _Optional[bool] = ...) -> None: ...

class CommandResponse(_message.Message):
    __slots__ = ("command_id", "success", "message")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    success: bool
    message: str
    def __init__(self, command_id: _Optional[str] = ..., success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "name", "args")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    name: str
    args: _containers.ScalarMap[str, str]
    def __init__(self, command_id: _Optional[str] = ..., name: _Optional[str] = ..., args: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("schema_version", "sensor_id", "sent_at", "capabilities", "queue_epoch", "server_time", "heartbeat", "chunk_request", "chunk_ack", "command_response", "command")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    schema_version: str
    sensor_id: str
    sent_at: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    queue_epoch: str
    server_time: str
    heartbeat: Heartbeat
    chunk_request: ChunkRequest
    chunk_ack: ChunkAck
    command_response: CommandResponse
    command: Command
    def __init__(self, schema_version: _Optional[str] = ..., sensor_id: _Optional[str] = ..., sent_at: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., queue_epoch: _Optional[str] = ..., server_time: _Optional[str] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., chunk_request: _Optional[_Union[ChunkRequest, _Mapping]] = ..., chunk_ack: _Optional[_Union[ChunkAck, _Mapping]] = ..., command_response: _Optional[_Union[CommandResponse, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...
