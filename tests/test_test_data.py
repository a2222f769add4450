"""Without the test data the suite stops at once with one message (issue: "The tests without ../shared")."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_missing_test_data_stops_the_session_with_one_message(tmp_path):
    env = dict(os.environ, TOKENSCOPE_TEST_DATA=str(tmp_path / "nowhere"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_lists.py"],
                          capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    assert "tokenscope's tests need the DeiT-Tiny weights" in output and "TOKENSCOPE_TEST_DATA" in output
    assert "passed" not in output and "error" not in output.lower().replace("exit", "")
