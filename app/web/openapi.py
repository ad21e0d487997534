"""The OpenAPI document of the worker's web API, built from the wire models."""

from __future__ import annotations

from functools import cache
from typing import Any

from app.errors import CODES
from app.models import WriteRequest

_ERROR = {
    "type": "object",
    "required": ["success", "error", "metadata"],
    "properties": {
        "success": {"const": False},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": sorted(CODES)},
                "message": {"type": "string"},
                "details": {},
            },
        },
        "metadata": {
            "type": "object",
            "properties": {
                "requestId": {"type": "string"},
                "timestamp": {"type": "string", "format": "date-time"},
                "path": {"type": "string"},
                "method": {"type": "string"},
            },
        },
    },
}

_ACCEPTED = {
    "type": "object",
    "required": ["durable", "messageId", "partition", "offset", "timestamp"],
    "properties": {
        "durable": {"const": True},
        "messageId": {"type": "string"},
        "transactionId": {"type": "string"},
        "topic": {"type": "string"},
        "partition": {"type": "integer"},
        "offset": {"type": "integer"},
        "timestamp": {"type": "string", "format": "date-time"},
        "message": {"type": "string"},
    },
}


_MESSAGE_STATUS = {
    "type": "object",
    "required": ["messageId", "namespace", "status", "targets"],
    "properties": {
        "messageId": {"type": "string"},
        "namespace": {"type": "string"},
        "status": {
            "enum": [
                "pending",
                "delayed",
                "rejected",
                "retrying",
                "completed",
                "dlq",
                "dropped",
                "failed",
            ]
        },
        "admission": {"enum": ["accepted", "delayed", "rejected"]},
        "acceptedAt": {"type": "integer", "description": "ms since the epoch"},
        "updatedAt": {"type": "integer"},
        "dueAt": {"type": "integer"},
        "transactionId": {"type": "string"},
        "error": {"type": "object"},
        "targets": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "status": {
                        "enum": ["delivered", "retrying", "dead_lettered", "dropped", "failed"]
                    },
                    "attempts": {"type": "integer"},
                    "at": {"type": "integer"},
                    "nextAttemptAt": {"type": "integer"},
                    "lastError": {"type": "object"},
                },
            },
        },
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_BACKFILL = {
    "summary": "Deliver a namespace's writes that wal-deliver holds again, to one target "
    "(admin key; progress as JSON lines, then a summary)",
    "security": [{"apiKey": []}, {"bearer": []}],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["namespace", "target"],
                    "properties": {
                        "namespace": {"type": "string"},
                        "target": {"type": "string"},
                        "since": {"type": ["integer", "null"], "description": "epoch ms"},
                        "until": {"type": ["integer", "null"], "description": "epoch ms"},
                        "dryRun": {"type": "boolean"},
                        "rate": {"type": ["number", "null"], "exclusiveMinimum": 0},
                    },
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "One JSON object a line: start, progress..., then done or error; "
            "each with total, read, matched, reEmitted, skipped, skippedBy, dryRun",
            "content": {"application/x-ndjson": {}},
        },
        "400": _error("Invalid body (INVALID_JSON, VALIDATION_ERROR, a disabled target)"),
        "401": _error("No API key (UNAUTHORIZED)"),
        "403": _error("Not an admin key, or no admin key configured (FORBIDDEN)"),
        "404": _error("Unknown namespace or target (NAMESPACE_NOT_FOUND, TARGET_NOT_FOUND)"),
    },
}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_PAUSE = {
    "summary": "Pause (or resume) a namespace's deliveries, or one target's (admin key)",
    "security": [{"apiKey": []}, {"bearer": []}],
    "parameters": [_path_param("name")],
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"target": {"type": "string"}, "reason": {"type": "string"}},
                }
            }
        }
    },
    "responses": {
        "200": {"description": "{namespace, target, changed, paused}"},
        "401": _error("No API key (UNAUTHORIZED)"),
        "403": _error("Not an admin key, or no admin key configured (FORBIDDEN)"),
        "404": _error("Unknown namespace or target (NAMESPACE_NOT_FOUND, TARGET_NOT_FOUND)"),
    },
}

_CANCEL = {
    "summary": "Cancel a message not delivered yet (admin key, or the namespace's own key); "
    "answers once settled: outcome cancelled, delivered (cancellation lost the race), "
    "partially cancelled, dead-lettered, rejected, or pending",
    "security": [{"apiKey": []}, {"bearer": []}],
    "parameters": [_path_param("message_id")],
    "responses": {
        "200": {"description": "{messageId, outcome, status}"},
        "401": _error("No API key (UNAUTHORIZED)"),
        "403": _error("Neither an admin key nor the namespace's (FORBIDDEN)"),
        "503": _error("Too many cancellations held (CANCELLATIONS_FULL)"),
    },
}


def _get(
    summary: str,
    param: str | None = None,
    not_found: str | None = None,
    schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if schema is not None:
        ok["content"] = {"application/json": {"schema": schema}}
    responses: dict[str, Any] = {"200": ok, "503": _error("Its owner is not known (rebalance)")}
    if not_found:
        responses["404"] = _error(not_found)
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if param:
        operation["parameters"] = [_path_param(param)]
    return {"get": operation}


@cache
def document() -> dict[str, Any]:
    request_schema = WriteRequest.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    defs = request_schema.pop("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "WAL fleet",
            "version": "1",
            "description": "Write-ahead-log worker API.",
        },
        "paths": {
            "/wal/write": {
                "post": {
                    "summary": "Write a request to the log (acknowledged by Kafka with acks=all)",
                    "security": [{"apiKey": []}, {"bearer": []}, {}],
                    "parameters": [
                        {
                            "name": "X-Request-ID",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/WriteRequest"}
                            }
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Durable in Kafka",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                        },
                        "400": _error(
                            "Invalid request (INVALID_JSON, VALIDATION_ERROR, TARGET_NOT_FOUND)"
                        ),
                        "401": _error("Missing or unknown API key (UNAUTHORIZED)"),
                        "403": _error("Key or address not allowed, namespace disabled"),
                        "404": _error("Unknown namespace (NAMESPACE_NOT_FOUND)"),
                        "413": _error("Too large (MESSAGE_SIZE_LIMIT_EXCEEDED, PAYLOAD_TOO_LARGE)"),
                        "429": _error("Rate limit exceeded; see Retry-After"),
                        "503": _error("Kafka did not acknowledge (PRODUCER_UNAVAILABLE)"),
                    },
                }
            },
            "/wal/admin/backfill": {"post": _BACKFILL},
            "/wal/admin/namespaces/{name}/pause": {"post": _PAUSE},
            "/wal/admin/namespaces/{name}/resume": {"post": _PAUSE},
            "/wal/namespaces": {
                "get": {"summary": "List namespaces", "responses": {"200": {"description": "OK"}}}
            },
            "/wal/namespaces/{name}/status": _get(
                "One namespace's configuration summary and state", "name", "Unknown namespace"
            ),
            "/wal/namespaces/{name}/metrics": _get(
                "One namespace's counts, rates and latency (from its owner)",
                "name",
                "Unknown namespace",
            ),
            "/wal/transactions/{txn_id}": _get(
                "A transaction's status and its mutations' (from its owner)",
                "txn_id",
                "Unknown or expired transaction",
            ),
            "/wal/messages/{message_id}": {
                **_get(
                    "What became of a message, per target (from its owner)",
                    "message_id",
                    "Unknown message, or older than WAL_STATUS_RETENTION_S",
                    _MESSAGE_STATUS,
                ),
                "delete": _CANCEL,
            },
            "/wal/fleet": _get("Every worker's assignment, lag and circuits"),
            "/wal/dashboard": {
                "get": {
                    "summary": "The fleet dashboard (HTML, refreshes itself)",
                    "responses": {"200": {"description": "OK", "content": {"text/html": {}}}},
                }
            },
            "/health/live": {
                "get": {"summary": "Liveness", "responses": {"200": {"description": "OK"}}}
            },
            "/health/ready": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready"},
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "WriteRequest": request_schema,
                **defs,
                "Error": _ERROR,
                "Accepted": _ACCEPTED,
            },
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }
