"""transformers' own common model and configuration tests (`ModelTesterMixin`, `ConfigTester`), for the
installed transformers version.

They live in transformers' `tests/` folder, which the wheel does not install. Rather than vendoring
~7,000 lines that would drift from the installed library, the first use downloads the sdist of exactly the
installed version with pip (the project's CI has PyPI access) and keeps its top-level test files in a
cache (`$TOT_CAKT_TEST_CACHE`, default `~/.cache/tot-cakt`). The sdist lacks three helper modules those
files import; `shims/` provides them (each file says why its stand-in suffices). `parameterized`, which
the common tests import, comes with the package's `dev` extra.
To run offline, fill the cache once on a machine with PyPI access (or copy it).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"  # the sdist's `tests/`, under a name that cannot clash with this repository's
SHIMS = {
    "exporters/test_export.py": "export_mixin.py",
    "generation/test_utils.py": "generation_mixin.py",
    "utils/test_configuration_utils.py": "configuration_utils.py",
}


def cache_dir() -> Path:
    root = os.environ.get("TOT_CAKT_TEST_CACHE") or Path.home() / ".cache" / "tot-cakt"
    return Path(root) / f"transformers-{transformers.__version__}-tests"


def _pip(*args: str, what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"Could not fetch {what} with pip (needed for transformers' common model tests): "
            f"{result.stderr.strip()[-1500:]}\nRun once with PyPI access, or fill {cache_dir()} from a machine "
            "that has it."
        )


def _fetch_sdist_tests(target: Path) -> None:
    """Extract the top-level `tests/*.py` (and the licence) of the installed version's sdist into `target`."""
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as download:
        _pip(
            "download", "--no-binary", ":all:", "--no-deps", "-d", download, f"transformers=={version}",
            what=f"the transformers {version} sdist",
        )  # fmt: skip
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}."))  # another run may fetch too
        (staging / PACKAGE).mkdir()
        with tarfile.open(archive) as sdist:
            for member in sdist.getmembers():
                parts = Path(member.name).parts
                top_level_test = len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py")
                if top_level_test or parts[1:] == ("LICENSE",):
                    destination = staging / (PACKAGE if top_level_test else "") / parts[-1]
                    destination.write_bytes(sdist.extractfile(member).read())
    shims = Path(__file__).parent / "shims"
    (staging / PACKAGE / "__init__.py").touch()
    for module, shim in SHIMS.items():
        path = staging / PACKAGE / module
        path.parent.mkdir(exist_ok=True)
        (path.parent / "__init__.py").touch()
        shutil.copy(shims / shim, path)
    try:
        staging.rename(target)
    except OSError:  # another run was first
        shutil.rmtree(staging)


def import_common_tests():
    """Return transformers' `test_modeling_common` and `test_configuration_common` modules."""
    target = cache_dir()
    if not (target / PACKAGE / "test_modeling_common.py").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _fetch_sdist_tests(target)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
