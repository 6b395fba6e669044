"""Shared fixtures: tiny offline configs on scikit-learn's digits (8x8) with small timm models."""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# `make test` runs the suite on 2 pytest-xdist workers (one per core, each on one thread); a plain `pytest` run
# keeps both threads in its one process
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

KILL_ENV = "PROCKD_KILL_AFTER_STEPS"
KILL_HOOK = Path(__file__).parent / "killhook"  # sitecustomize.py: the kill, outside the package


def kill_after(steps: int, env: dict | None = None) -> dict:
    """The environment of a process that SIGKILLs itself after its ``steps``-th optimiser step (the resume tests):
    tests/killhook/sitecustomize.py wraps the loop's optimiser step in that process only."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(KILL_HOOK), *filter(None, [env.get("PYTHONPATH")])])
    env[KILL_ENV] = str(steps)
    return env


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    """Every test starts from the same global random state and thread count, whatever ran before it in its process
    (pytest-xdist gives a worker a different set of tests from run to run): a test's outcome does not depend on the
    order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a run trained in-process with train.num_threads leaves the worker as it was


# random weights on purpose (``pretrained: false``): a teacher without weights is an error unless asked for
TINY_VIT = {"name": "vit_tiny_patch16_224", "pretrained": False, "in_chans": 1, "input_size": 8, "mean": [0.3], "std": [0.4],
            "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2,
                       "mlp_ratio": 2.0}}
TINY_CNN = {"name": "resnet18", "pretrained": False, "in_chans": 1, "input_size": 16, "mean": [0.3], "std": [0.4],
            "kwargs": {"channels": [8, 16, 16, 16], "stem_width": 8, "num_classes": 4},
            "taps": ["layer1", "layer2"], "fusion_size": [2, 2]}


def tiny_config(tmp_path: Path, method: str = "prockd", **over) -> dict:
    """A raw experiment config that trains in about a second on digits."""
    cfg = {
        "seed": 0,
        "out": str(tmp_path / "run"),
        "teacher": copy.deepcopy(TINY_CNN),
        "student": copy.deepcopy(TINY_VIT),
        "data": {"name": "digits", "classes": [5, 6, 7, 8, 9], "labels_per_class": 20},
        # the paper's settings (tests check its equations; the default preset is robust_calibrated)
        "method": {"name": method, "params": {"preset": "paper", "num_prototypes": 4} if method == "prockd" else {}},
        "train": {"epochs": 3, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 1, "progress": False},
        "cache": {"dir": str(tmp_path / "cache"), "dtype": "float32"},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


@pytest.fixture
def tiny(tmp_path):
    """Factory for tiny raw configs."""
    return lambda method="prockd", **over: tiny_config(tmp_path, method, **over)


# `make test` hands whole modules to its 2 pytest-xdist workers (--dist loadscope: a module's fixtures, such as the
# wheel's venv, are built once) in collection order (--no-loadscope-reorder; xdist's own order puts modules with many
# tests first, which left the wheel's 3-test module, the longest, to start last while the other worker idled). The
# slowest modules go first, longest first (their durations in a fresh clone: docs/benchmarks.md), and the short ones
# fill in behind them.
SLOWEST_FIRST = ["test_wheel.py", "test_detection_pipeline.py", "test_ddp.py", "test_engine.py",
                 "test_detection_paper_configs.py", "test_paper_configs.py", "test_docs_python.py",
                 "test_own_data_walkthrough.py", "test_init_and_memory_bench.py", "test_deploy_onnx.py",
                 "test_bench_compare.py"]


# `make test-fast` (the edit loop's tier, about two minutes on 2 cores) leaves out the end-to-end modules above and the
# tests that launch processes of their own; `make test` (CI) runs everything
SLOW_TESTS = {"test_finetune_distil_killed_in_either_stage_resumes_to_identical_metrics",
              "test_a_killed_cache_build_leaves_nothing_that_survives_the_next_start",
              "test_killed_run_resumes_to_identical_metrics"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end or multi-process; left out of make test-fast")


def pytest_collection_modifyitems(config, items):
    """Order the collected tests by :data:`SLOWEST_FIRST` (a stable sort: the other modules, and every module's own
    tests, keep their order) and mark the slow ones (:data:`SLOW_TESTS`, the modules of :data:`SLOWEST_FIRST`)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        if item.path.name in rank or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
