"""`pip install .` ships the package, the `vlmtune` console script, the version and the optional extras."""

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

from tests.conftest import REPO
from vlmtune import __version__


def test_wheel_has_console_script_version_and_extras(tmp_path):
    src = tmp_path / "project"  # a copy, so the build writes nothing into the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    shutil.copytree(REPO / "vlmtune", src / "vlmtune", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        "dist",
        str(src),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (wheel,) = (tmp_path / "dist").glob("vlmtune-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"vlmtune-{__version__}.dist-info"
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert metadata["Version"] == __version__
    assert "vlmtune = vlmtune.cli:main" in entry_points
    assert {"vlmtune/cli.py", "vlmtune/notebook.py", "vlmtune/config/schema.py"} <= set(names)
    assert not any(n.startswith("tests/") for n in names)
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"bnb", "deepspeed", "liger", "notebook", "dev"} <= extras
    requires = metadata.get_all("Requires-Dist")
    for package in ("nbclient", "nbformat", "ipykernel", "wandb"):  # what the tests need, installed by CI
        assert any(r.startswith(package) and 'extra == "dev"' in r for r in requires), package

    # Installed from the wheel (not from this checkout), the console script runs.
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [str(target / "bin/vlmtune"), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.stdout.strip() == f"vlmtune {__version__}", proc.stderr
