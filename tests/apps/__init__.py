"""ASGI apps and scripts that the real-server tests run in uvicorn subprocesses."""
