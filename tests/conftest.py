from __future__ import annotations

import os
import sys

# Worker functions of distributed tests live in the test modules; spawned children
# must be able to import them by module name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The shared moto server fixture, for every test module that asks for ``s3``. Imported into
# each test module instead, it reads as an unused import that the tests' ``s3`` parameters
# redefine (pyflakes F401, F811).
from s3server import s3  # noqa: F401
