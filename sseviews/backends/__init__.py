"""Live delivery backends: carry published events to every process's subscribers.

`memory.py` serves one process; `redis.py` (extra `sseviews[redis]`) serves any
number of processes and machines sharing one Redis.
"""
