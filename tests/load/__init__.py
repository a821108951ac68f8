"""Load, soak and shutdown-under-load tests against a real uvicorn.

`app.py` is the server under test, `run.py` the standalone load runner
(`python -m tests.load.run --help`), and `test_load.py` runs both at CI size.
"""
