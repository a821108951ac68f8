"""Shared test scaffolding: real servers and topologies that several test modules start.

`redis_topology`: a Sentinel group and a Redis Cluster made of `redis-server`
processes on spare loopback ports, with their pytest fixtures (registered in
`tests/conftest.py`).
"""
