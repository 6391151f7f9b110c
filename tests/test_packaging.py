"""Packaging: every module imports on the oldest Python that pyproject.toml admits."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

WITHOUT_TOMLLIB = """
import importlib, pkgutil, sys, tomllib
sys.modules["tomli"] = tomllib  # what Python 3.10 installs from PyPI, under its own name
del sys.modules["tomllib"]

class NoTomllib:  # Python 3.10 has no tomllib in its standard library
    def find_spec(self, name, path=None, target=None):
        if name == "tomllib":
            raise ModuleNotFoundError("No module named 'tomllib'", name="tomllib")
        return None

sys.meta_path.insert(0, NoTomllib())
import atoll
names = [m.name for m in pkgutil.walk_packages(atoll.__path__, "atoll.")]
for name in names:
    importlib.import_module(name)
from atoll.config import read_toml
print(len(names), "modules")
"""


def test_every_module_imports_where_the_standard_library_has_no_tomllib():
    done = subprocess.run([sys.executable, "-c", WITHOUT_TOMLLIB], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) > 30
