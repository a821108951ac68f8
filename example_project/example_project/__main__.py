"""`python -m example_project [--host HOST] [--port PORT]`: serve the app with uvicorn."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m example_project", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000")
    args = parser.parse_args(argv)
    print(f"example_project: open http://{args.host}:{args.port}/ in a browser")
    uvicorn.run("example_project:app", host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
