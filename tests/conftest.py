"""Test-wide settings: one intra-op thread, and a cache of their own.

The tests use tiny models, for which torch's thread pool costs more than it gains, and on a loaded 2-core machine
oversubscribed threads made them 10-30x slower. Subprocesses started by the tests inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never read or write the user's cache (``$XDG_CACHE_HOME/fewstep``: teacher evaluations, diffusers
    latents, DisBack paths): one temporary cache for the session, which subprocesses inherit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()
