"""OpenAI-compatible HTTP serving (needs the ``serve`` extra: fastapi, uvicorn, prometheus-client)."""
