"""The serving daemon: one process, one engine, served over gRPC and the OpenAI-compatible HTTP API."""
