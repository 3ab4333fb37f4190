"""Errors of the serving path, each tied to the gRPC status it becomes.

Raised anywhere below the servicer (validation, scheduler, engine wrapper) without importing grpc;
the servicer maps them to a status in one place (`service.server.servicer._status_of`). `status` is the name of
a `grpc.StatusCode` member and is also the `code` label of the request metrics.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: a request failed with `status` and a message meant for the client."""

    status = "INTERNAL"


class InvalidArgument(ServiceError):
    """The request breaks a documented limit; the message names the field and the limit."""

    status = "INVALID_ARGUMENT"


class ModelNotFound(ServiceError):
    """The request names a model this server has not loaded."""

    status = "NOT_FOUND"


class QueueFull(ServiceError):
    """The scheduler queue cannot take the request's sentences now; the client should back off."""

    status = "RESOURCE_EXHAUSTED"


class MessageTooLarge(ServiceError):
    """The request message is larger than ServerConfig.max_message_bytes."""

    status = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ServiceError):
    """The request asks for something this server's configuration does not do."""

    status = "FAILED_PRECONDITION"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its sentences were computed."""

    status = "DEADLINE_EXCEEDED"


class Unavailable(ServiceError):
    """The server is not ready (models loading) or is draining."""

    status = "UNAVAILABLE"


class EngineFailure(ServiceError):
    """The engine raised on the batch that held the request's sentences."""

    status = "INTERNAL"
