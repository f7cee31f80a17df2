from __future__ import annotations

import os
import sys

# Worker functions of distributed tests live in the test modules; spawned children
# must be able to import them by module name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
