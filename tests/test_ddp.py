"""Data-parallel training launched by torchrun (2 CPU processes, gloo) against one process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from prockd.classification.config import build_config
from prockd.classification.engine import train
from prockd.core.distributed import DistInfo, shard
from tests.conftest import kill_after

TOL = 1e-4  # float32 sums in another order (all-reduce of two half-batch gradients vs one batch), 21 AdamW steps


def _cfg(tiny, tmp_path, method="prockd"):
    raw = tiny(method)
    raw["train"].update(epochs=3, batch_size=16, num_threads=1, clip_grad=None, keep_state=True)  # last.pt compared
    raw["data"]["labels_per_class"] = 20  # 100 images: 7 steps per epoch, the last batch has 4 images
    p = tmp_path / f"{method}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _run(args, nproc: int, kill: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PROCKD_DIST_TIMEOUT="120")
    env = kill_after(kill, env) if kill else env
    cmd = [sys.executable, "-m", "prockd.cli", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "prockd.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def test_shards_cover_each_global_batch_once():
    idx = torch.arange(10)
    parts = [shard(idx, DistInfo(r, 3, r)) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    short = [shard(torch.arange(1), DistInfo(r, 2, r)) for r in range(2)]
    assert all(len(p) == 1 for p in short)  # no rank is idle on a short last batch


@pytest.mark.parametrize("method", ["prockd", "fitnets"])
def test_ddp_two_processes_match_one_and_resume(tiny, tmp_path, method):
    """Two ranks (torchrun) end where one process ends (TOL: float sums in another order); ProC-KD's two-rank run
    killed in epoch 2 and relaunched ends exactly where the uninterrupted two-rank run ends."""
    cfg = _cfg(tiny, tmp_path, method)
    # the one-process reference trains in this process (the CLI's engine, train.num_threads 1 as each rank)
    train(build_config(yaml.safe_load(cfg.read_text())), tmp_path / "single", log=lambda m: None)
    two = _run(["train", "--config", str(cfg), "--out", str(tmp_path / "ddp")], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = _state(tmp_path / "single"), _state(tmp_path / "ddp")
    assert _max_diff(s1["distiller"], s2["distiller"]) < TOL
    h1, h2 = s1["history"][-1], s2["history"][-1]
    for k in h1:
        if k.startswith("loss/"):
            assert abs(h1[k] - h2[k]) < 1e-4, k  # losses reduced over ranks = the single-process values
        if k.startswith("test"):
            assert abs(h1[k] - h2[k]) < 1.01, k  # accuracies summed over the ranks' test shards
    assert s2["epoch"] == 2 and (tmp_path / "ddp" / "student.pt").is_file()
    if method != "prockd":
        return
    # DDP resume: both ranks are killed in epoch 2 (step 9), the relaunch continues from epoch 1's checkpoint
    killed = _run(["train", "--config", str(cfg), "--out", str(tmp_path / "resume")], 2, kill=9)
    assert killed.returncode != 0 and _state(tmp_path / "resume")["epoch"] == 0
    again = _run(["train", "--config", str(cfg), "--out", str(tmp_path / "resume")], 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert _max_diff(_state(tmp_path / "resume")["distiller"], s2["distiller"]) < 1e-6
