"""Test-wide settings: one intra-op thread.

The tests use tiny models, for which torch's thread pool costs more than it gains, and on a loaded 2-core machine
oversubscribed threads made them 10-30x slower. Subprocesses started by the tests inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
