"""Packaging contract (DESIGN.md §2): `kernels/` ships as `grpo_fast.kernels`, never as a
top-level `kernels` module, because Hugging Face's `kernels` package owns that name and
transformers probes for it on import."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Computes transformers' answer in a child process. With "--without", grpo-fast is taken off the
# import system first (its editable finder and the repo paths it adds), as if it were not installed.
_PROBE = r"""
import json, sys
if "--without" in sys.argv:
    repo = sys.argv[-1]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path[:] = [p for p in sys.path if p not in ("", repo, repo.rsplit("/", 1)[0])]
from transformers.utils.import_utils import is_kernels_available
import importlib.util
spec = importlib.util.find_spec("grpo_fast")
# The editable install leaves a bare site-packages/grpo_fast/ holding only _C: a namespace, no code.
print(json.dumps({"kernels": bool(is_kernels_available()), "grpo_fast": spec is not None and spec.origin is not None}))
"""


def _probe(*args, cwd):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args, str(REPO)], cwd=cwd, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_grpo_fast_kernels_is_importable_as_subpackage():
    import grpo_fast.kernels  # noqa: F401

    assert Path(grpo_fast.kernels.__path__[0]).resolve() == (REPO / "kernels").resolve()
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must stay a namespace folder"


@pytest.mark.parametrize("cwd", [REPO, Path("/")], ids=["from-repo-root", "from-elsewhere"])
def test_transformers_kernels_probe_unchanged_by_install(cwd):
    with_pkg = _probe(cwd=cwd)
    without_pkg = _probe("--without", cwd=cwd)
    assert with_pkg["grpo_fast"] and not without_pkg["grpo_fast"], "probe did not remove grpo-fast"
    assert with_pkg["kernels"] == without_pkg["kernels"]


@pytest.mark.slow
def test_wheel_holds_only_grpo_fast(tmp_path):
    """Build a real wheel (CPU-only native core, to keep it quick) and read its file list."""
    cmd = [
        sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
        "-w", str(tmp_path), "-Ccmake.define.GRPO_FAST_CUDA=OFF", f"-Cbuild-dir={tmp_path / 'build'}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("grpo_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level <= {"grpo_fast", next(t for t in top_level if t.endswith(".dist-info"))}, top_level
    kernel_sources = {p.name for p in (REPO / "kernels").glob("*.py")}
    shipped = {n.split("/")[-1] for n in names if n.startswith("grpo_fast/kernels/")}
    assert kernel_sources <= shipped, f"missing from wheel: {kernel_sources - shipped}"
    assert any(n.startswith("grpo_fast/_C") and n.endswith(".so") for n in names), "native core missing"
