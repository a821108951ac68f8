"""`tsc`, the TypeScript compiler, for the tests of `sseviews typescript`.

`.ci/run` installs the npm package `typescript` into `tests/browser/node_modules`
(git-ignored); the tests that need it are skipped without it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

TSC = Path(__file__).resolve().parents[1] / "browser" / "node_modules" / ".bin" / "tsc"
# What a front end would use: strict, ES modules, the DOM.
TSC_OPTIONS = ["--strict", "--target", "es2020", "--module", "es2020", "--lib", "es2020,dom"]


def tsc(folder: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `tsc` with the strict options and `arguments` in `folder`."""
    if not TSC.exists():
        pytest.skip(f"{TSC} is missing: run the npm step of .ci/run (npm install typescript@5)")
    return subprocess.run(
        [str(TSC), *TSC_OPTIONS, *arguments],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
