"""The HTTP API: FastAPI app factory, settings as dependencies, one router per resource."""
