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


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


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
            "/wal/namespaces": {
                "get": {"summary": "List namespaces", "responses": {"200": {"description": "OK"}}}
            },
            "/wal/namespaces/{name}/status": {
                "get": {
                    "summary": "One namespace's configuration summary and state",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": {"description": "OK"}, "404": _error("Unknown namespace")},
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
