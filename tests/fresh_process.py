"""Code in a fresh Python process, for what a process decides once: the AVX2 / baseline kernel
choice (GRPO_FAST_NO_AVX2), MKL's threading mode, CUDA's visibility."""

import os
import subprocess
import sys
import textwrap


def run_fresh(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """`code` in a fresh Python process (with `env` added to this one's environment): its stdout,
    stripped. A non-zero exit fails the calling test with the process's stderr."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **env} if env else None)
    assert out.returncode == 0, out.stderr[-5000:]
    return out.stdout.strip()
