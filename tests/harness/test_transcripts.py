"""Every transcript under tests/harness/testdata/ runs on the real node core and must print
exactly what it says (`pytest tests/harness --rewrite` writes the actual output back)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.datadriven import run_file
from tests.harness.transcripts import Transcript

TESTDATA = Path(__file__).parent / "testdata"


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.txt")), ids=lambda p: p.stem)
def test_transcript(path: Path, request) -> None:
    problems = run_file(path, Transcript().execute, rewrite=request.config.getoption("--rewrite"))
    assert not problems, "\n\n".join(problems)
