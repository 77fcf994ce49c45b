"""The OpenAI-compatible HTTP server (`sambay serve`): schemas, protocol mapping, app, runtime, metrics.

Needs the `serve` extra (fastapi, uvicorn, pydantic, prometheus_client, httpx); `import sambay` does not.
"""
