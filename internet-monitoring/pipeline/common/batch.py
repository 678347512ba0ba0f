"""Several chunks in one POST (capability ``batch``): the per-chunk answer and its JSON codec.

A batch is answered chunk by chunk and positionally: ``results[i]`` answers ``chunks[i]``.
Each answer is either the 1.0 ``IngestResult`` or a ``ChunkRejection`` (the same
``{"error", "message", "field"}`` body a single-chunk POST would get, plus the chunk's
``sequence`` when it could be read), so one refused chunk never fails its neighbours::

    request  {"chunks": [<1.0 chunk>, ...]}
    answer   {"results": [<1.0 ingest result> | {"error", "message", "field"?, "sequence"?}, ...]}

Chunks are validated by ``messages.chunk_from_json``, exactly as a single chunk. The
Protobuf twin (``ChunkBatch`` / ``IngestBatchResult``) lives in ``proto_codec``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    MissingField,
    PayloadTooLarge,
    PipelineError,
    ProtocolError,
    Throttled,
)
from pipeline.common.messages import (
    MAX_MESSAGE,
    MAX_STRING,
    Chunk,
    IngestResult,
    _load_json_object,
    chunk_from_json,
    chunk_to_json,
    ingest_result_from_json,
    ingest_result_to_json,
    read_int,
    read_str,
)

log = logging.getLogger(__name__)

# A batch is bounded by the chunk count as well as by the HTTP body cap, so that a body of
# many tiny chunks cannot make the server do unbounded per-chunk work in one request.
MAX_BATCH_CHUNKS = 1024
MAX_ERROR_CODE = 64
ERROR_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _error_classes() -> dict[str, type[PipelineError]]:
    """Map each error ``code`` to its class; a subclass sharing its parent's code wins."""
    table: dict[str, type[PipelineError]] = {}
    pending: list[type[PipelineError]] = [PipelineError]
    while pending:
        cls = pending.pop(0)
        table[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return table


_ERROR_CLASSES = _error_classes()


def _clean(text: str, max_len: int) -> str:
    """Error texts may quote peer input (a field name): keep them encodable and bounded."""
    return text[:max_len].encode("utf-8", "replace").decode("utf-8")


@dataclass(frozen=True)
class ChunkRejection:
    """One chunk of a batch refused on its own; the chunk is neither stored nor acked."""

    code: str
    message: str
    field: str | None = None
    sequence: int | None = None

    @classmethod
    def from_error(cls, error: PipelineError, sequence: int | None = None) -> ChunkRejection:
        """The rejection a handler sends for ``error``; never longer than a decoder accepts."""
        return cls(code=error.code[:MAX_ERROR_CODE], message=_clean(error.message, MAX_MESSAGE),
                   field=None if error.field is None else _clean(error.field, MAX_STRING),
                   sequence=sequence)

    @property
    def http_status(self) -> int:
        """The status the same error gets as the answer to a single-chunk POST."""
        return _ERROR_CLASSES.get(self.code, PipelineError).http_status

    def to_error(self) -> PipelineError:
        """Rebuild the error so a sensor can apply the same retry rules as for one chunk."""
        cls = _ERROR_CLASSES.get(self.code)
        if cls is None:
            error = PipelineError(self.message, field=self.field)
            error.code = self.code
            return error
        if issubclass(cls, Throttled):
            return cls(self.message)
        return cls(self.message, field=self.field)


BatchOutcome = IngestResult | ChunkRejection


def batch_outcomes(results: Sequence[IngestResult | ChunkRejection | PipelineError],
                   chunks: Sequence[Chunk | PipelineError] | None = None) -> list[BatchOutcome]:
    """Normalise a handler's per-chunk outcomes into answers.

    An error at position ``i`` becomes a ``ChunkRejection`` carrying ``chunks[i].sequence``
    when ``chunks`` (typically the output of a lenient batch decode) holds a chunk there.
    """
    if chunks is not None and len(chunks) != len(results):
        raise PipelineError(f"batch has {len(chunks)} chunks but {len(results)} results")
    outcomes: list[BatchOutcome] = []
    for index, result in enumerate(results):
        if isinstance(result, PipelineError):
            chunk = chunks[index] if chunks is not None else None
            sequence = chunk.sequence if isinstance(chunk, Chunk) else None
            outcomes.append(ChunkRejection.from_error(result, sequence))
        else:
            outcomes.append(result)
    return outcomes


def check_batch_size(count: int) -> None:
    if count == 0:
        raise FieldValueError("field chunks must not be empty", field="chunks")
    if count > MAX_BATCH_CHUNKS:
        raise PayloadTooLarge(f"field chunks holds more than {MAX_BATCH_CHUNKS} chunks",
                              field="chunks")


def check_results_size(count: int) -> None:
    if count > MAX_BATCH_CHUNKS:
        raise PayloadTooLarge(f"field results holds more than {MAX_BATCH_CHUNKS} results",
                              field="results")


def in_batch(error: ProtocolError, index: int, container: str = "chunks") -> ProtocolError:
    """The same error, renamed to point at item ``index`` of the batch (strict decoding)."""
    where = f"{container}[{index}]"
    field = where if error.field is None else f"{where}.{error.field}"
    return type(error)(f"{where}: {error.message}", field=field)


def first_error(items: Sequence[Any]) -> None:
    """Raise the first ``ProtocolError`` found in a lenient decode, renamed to its position."""
    for index, item in enumerate(items):
        if isinstance(item, ProtocolError):
            raise in_batch(item, index) from item


def log_rejections(items: Sequence[Any]) -> None:
    for index, item in enumerate(items):
        if isinstance(item, ProtocolError):
            log.debug("batch_chunk_rejected index=%d code=%s field=%s",
                      index, item.code, item.field)


# ---------------------------------------------------------------------------------------
# Chunks <-> JSON


def _read_list(doc: Mapping[str, Any], name: str) -> list[Any]:
    if name not in doc:
        raise MissingField(f"missing field {name}", field=name)
    value = doc[name]
    if not isinstance(value, list):
        raise FieldTypeError(f"field {name} must be a list", field=name)
    return value


def batch_to_json(chunks: Sequence[Chunk]) -> dict[str, Any]:
    return {"chunks": [chunk_to_json(chunk) for chunk in chunks]}


def encode_batch(chunks: Sequence[Chunk]) -> str:
    return json.dumps(batch_to_json(chunks), separators=(", ", ": "), ensure_ascii=False)


def _chunk_or_error(item: Any) -> Chunk | ProtocolError:
    if not isinstance(item, dict):
        return FieldTypeError("chunk must be a JSON object")
    try:
        return chunk_from_json(item)
    except ProtocolError as exc:
        return exc


def batch_from_json_lenient(doc: Mapping[str, Any]) -> list[Chunk | ProtocolError]:
    """Each chunk validated on its own; its error is returned in its place."""
    items = _read_list(doc, "chunks")
    check_batch_size(len(items))
    decoded = [_chunk_or_error(item) for item in items]
    log_rejections(decoded)
    return decoded


def decode_batch_lenient(data: bytes | str) -> list[Chunk | ProtocolError]:
    return batch_from_json_lenient(_load_json_object(data))


def decode_batch(data: bytes | str) -> list[Chunk]:
    """Strict: the first bad chunk fails the batch, its field named ``chunks[i].<field>``."""
    items = decode_batch_lenient(data)
    first_error(items)
    return [item for item in items if isinstance(item, Chunk)]


# ---------------------------------------------------------------------------------------
# Batch answer <-> JSON


def rejection_to_json(rejection: ChunkRejection) -> dict[str, Any]:
    doc: dict[str, Any] = {"error": rejection.code, "message": rejection.message}
    if rejection.field is not None:
        doc["field"] = rejection.field
    if rejection.sequence is not None:
        doc["sequence"] = rejection.sequence
    return doc


def rejection_from_json(doc: Mapping[str, Any]) -> ChunkRejection:
    return ChunkRejection(
        code=read_str(doc, "error", max_len=MAX_ERROR_CODE, pattern=ERROR_CODE_RE),
        message=read_str(doc, "message", max_len=MAX_MESSAGE),
        field=None if doc.get("field") is None else read_str(doc, "field"),
        sequence=None if doc.get("sequence") is None else read_int(doc, "sequence"),
    )


def outcome_to_json(outcome: BatchOutcome) -> dict[str, Any]:
    if isinstance(outcome, ChunkRejection):
        return rejection_to_json(outcome)
    return ingest_result_to_json(outcome)


def outcome_from_json(doc: Any) -> BatchOutcome:
    if not isinstance(doc, dict):
        raise FieldTypeError("result must be a JSON object")
    if "error" in doc:
        return rejection_from_json(doc)
    return ingest_result_from_json(doc)


def batch_result_to_json(results: Sequence[IngestResult | ChunkRejection | PipelineError],
                         chunks: Sequence[Chunk | PipelineError] | None = None) -> dict[str, Any]:
    return {"results": [outcome_to_json(o) for o in batch_outcomes(results, chunks)]}


def encode_batch_result(results: Sequence[IngestResult | ChunkRejection | PipelineError],
                        chunks: Sequence[Chunk | PipelineError] | None = None) -> str:
    return json.dumps(batch_result_to_json(results, chunks), separators=(", ", ": "),
                      ensure_ascii=False)


def batch_result_from_json(doc: Mapping[str, Any]) -> list[BatchOutcome]:
    items = _read_list(doc, "results")
    check_results_size(len(items))
    outcomes: list[BatchOutcome] = []
    for index, item in enumerate(items):
        try:
            outcomes.append(outcome_from_json(item))
        except ProtocolError as exc:
            raise in_batch(exc, index, "results") from exc
    return outcomes


def decode_batch_result(data: bytes | str) -> list[BatchOutcome]:
    return batch_result_from_json(_load_json_object(data))
