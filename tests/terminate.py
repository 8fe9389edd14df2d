"""Send SIGTERM to a command while it writes its output, and see what it leaves (used by the SIGTERM tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def terminate_while_writing(args: list[str], out: Path, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``scmm ARGS`` and send it SIGTERM as soon as its temporary output (``.<out name>.tmp-...`` beside
    ``out``) exists; returns the finished process (stdout, stderr as text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scmm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    try:
        while not any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.glob(".*")):
            if proc.poll() is not None:
                raise AssertionError(f"the command ended before it wrote anything: {proc.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError("no temporary output appeared")
            time.sleep(0.02)
        time.sleep(0.2)  # well inside the writing
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_terminated_cleanly(result: subprocess.CompletedProcess, folder: Path, expected: list[str]) -> None:
    """Exit 143, one line saying so (no traceback), and ``folder`` holding exactly ``expected`` (no temporary)."""
    assert result.returncode == 143, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: terminated by SIGTERM"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
