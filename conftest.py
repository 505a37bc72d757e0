"""Settings shared by both test trees (tests/, framework/tests/)."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on a 2-core machine: each worker and the processes it starts get one intra-op thread. Two
    # OpenMP teams of two threads on two cores spend most of their time in spin-waits (a tiny training run went
    # from 25 s to 155 s); a test that wants more threads sets OMP_NUM_THREADS itself.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
