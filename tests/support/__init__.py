"""Shared test scaffolding, written once: real servers, raw clients, apps and
topologies that several test modules use. Import it as `support.<module>` (pytest
puts `tests/` on `sys.path`); the fixtures are registered in `tests/conftest.py`.

- `servers`: a server (uvicorn, gunicorn, hypercorn, granian, daphne) in a
  subprocess on a free loopback port; several at once on one shared broadcast;
  the records the apps in `tests/apps/` write.
- `inprocess`: a real uvicorn in the test's own event loop.
- `raw`: raw HTTP/1.1 clients over loopback sockets (the test sees every byte and
  the framing), `RawEventStream` (a slow reader, if need be), and `SSEClient`, an
  event stream reader over anyio.
- `processes`: a free port, a clean environment, waiting for and stopping a process.
- `apps`: `app_for()`, a Starlette app whose lifespan connects a broadcast, and the
  presence tests' member view and apps.
- `views`: the traced views and recorders of the view tests.
- `broadcast`: a store that yields to other tasks, a recorder of what a live
  backend dispatches, and checks of composite ids.
- `asgi_recorder`: a middleware that records where each `send` and `receive` ran.
- `redis`: key prefixes on the shared Redis, MONITOR, and `redis-server`s of a
  test's own.
- `postgres`: the shared PostgreSQL's URLs, and dropping a test's tables.
- `redis_topology`: a Sentinel group and a Redis Cluster made of `redis-server`
  processes on spare loopback ports, with their pytest fixtures.
- `typescript`: `tsc`, the TypeScript compiler, for the typed client tests.
"""
