"""Step-level continuous batching of masked Flux Fill requests on one pipeline."""

from workers.engine.attention import CacheLookupError
from workers.engine.engine import Engine
from workers.engine.request import EngineRequest, RequestCancelled, RequestHandle, RequestStatus

__all__ = ["CacheLookupError", "Engine", "EngineRequest", "RequestCancelled", "RequestHandle", "RequestStatus"]
