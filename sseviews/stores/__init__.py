"""History stores: keep recent events per group so reconnecting clients can replay them.

`memory.py` is bounded and in-process; `redis.py` keeps the log in Redis Streams;
`sqlalchemy.py` keeps it in SQLite or PostgreSQL (extras `sqlite`, `postgres`).
"""
