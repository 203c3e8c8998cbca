"""The REST/SSE gateway: the documented HTTP API, served by calling the gRPC core."""
