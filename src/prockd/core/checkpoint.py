"""Checkpoints of every task: reading weights with errors that name the file, the epoch's ``last.pt`` (all an
exact resume needs: weights, optimiser, scheduler, scaler, RNG states) and ``best.pt`` (chosen on validation),
resuming, and the selected checkpoint's test results. Every file is written atomically."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from prockd.core.io import atomic_torch_save
from prockd.errors import ProckdError


def read_state_dict(path: str | Path, what: str) -> dict:
    """The state dict saved in ``path``: a ``.safetensors`` file (the format hubs ship), or a torch file (bare, or
    under ``model`` / ``state_dict`` / ``student``); DDP's ``module.`` prefixes removed. Errors name ``what`` and
    the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ProckdError(f"{what} checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        try:
            obj = load_safetensors(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ProckdError(f"{what} checkpoint {p} is not a readable safetensors file: {str(e)[:200]}") from None
        return {k.removeprefix("module."): v for k, v in obj.items()}
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user error
        raise ProckdError(f"{what} checkpoint {p} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ProckdError(f"{what} checkpoint {p} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint_into(model: nn.Module, path: str | Path, what: str, state: dict | None = None) -> None:
    """Load the checkpoint ``path`` (or its already read ``state``, see :func:`read_state_dict`) into ``model``;
    a missing, unexpected or wrongly shaped tensor is an error naming ``what`` and the file."""
    p = Path(path).expanduser()
    state = read_state_dict(p, what) if state is None else state
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ProckdError(f"{what} checkpoint {p} does not fit the model: {str(e)[:300]}") from None
    if missing or unexpected:
        raise ProckdError(f"{what} checkpoint {p} does not fit the model: missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                          f"{'...' if len(unexpected) > 3 else ''}")


def rng_state() -> dict:
    """The Python, NumPy, torch (and CUDA) RNG states."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    """Restore :func:`rng_state`'s states."""
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def resume_state(last: Path, dist, opt, sched, scaler, log=print, teacher: dict | None = None) -> tuple[int, float, list]:
    """Load ``last.pt`` (distiller, optimiser, scheduler, scaler, RNG states) when it exists; returns
    (first epoch to run, best selection score, history). ``teacher``: the frozen teacher's reference (its weights'
    source and digest; checkpoints hold it by reference, never its weights): a checkpoint of another teacher is an
    error. Shared by the classification and detection loops."""
    if not last.is_file():
        return 0, -1.0, []
    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"checkpoint {last} is unreadable: {e}") from None
    if teacher and state.get("teacher") and state["teacher"].get("digest") != teacher.get("digest"):
        raise ProckdError(f"checkpoint {last} was trained with another teacher ({state['teacher'].get('source')}, "
                          f"weights {state['teacher'].get('digest')}) than this config's ({teacher.get('source')}, "
                          f"{teacher.get('digest')}): use a new run directory (--out) or the original teacher")
    try:
        sd = state["distiller"]
        own = dist.state_dict()
        missing = {k for k in own if k not in sd}
        if missing and missing <= set(getattr(dist, "derived_buffers", ())):  # a checkpoint from before they existed
            sd = {**sd, **{k: own[k] for k in missing}}  # recomputed for every run before the resume
            log(f"{last}: {', '.join(sorted(missing))} not in the checkpoint (an earlier prockd's): recomputed")
        dist.load_state_dict(sd)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"checkpoint {last} is unreadable or does not fit this config: {e}") from None
    log(f"resumed from {last} at epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["best"], state["history"]


def save_epoch(ckpt_dir: Path, epoch: int, best: float, history: list, record: dict, improved: bool, dist,
               opt, sched, scaler, teacher: dict | None = None) -> None:
    """An epoch's ``last.pt`` (everything an exact resume needs: what trains, the optimiser's state of it, the
    schedule, the RNG states, and the frozen teacher by reference only) and, when it improved, ``best.pt`` (what
    the deployed model is made of, :meth:`~prockd.core.distiller.DistillerBase.deployed_state`). Both atomic;
    both training loops."""
    atomic_torch_save({"epoch": epoch, "best": best, "history": history, "distiller": dist.state_dict(),
                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "scaler": scaler.state_dict(), "rng": rng_state(), "teacher": teacher}, ckpt_dir / "last.pt")
    if improved:
        atomic_torch_save({"epoch": epoch, "distiller": dist.deployed_state(), "metrics": record},
                          ckpt_dir / "best.pt")


def select_best(ckpt_dir: Path, dist, primary: str, final: dict, tests, evaluate_tests) -> dict | None:
    """The test results of the checkpoint chosen on ``primary`` (``best.pt``): the last epoch's own when it is
    the chosen one and ``final`` holds them, else ``evaluate_tests()`` (after loading the checkpoint into
    ``dist`` unless it is the last epoch, which ``dist`` holds). None without a ``best.pt``."""
    path = ckpt_dir / "best.pt"
    if not path.is_file():
        return None
    chosen = torch.load(path, map_location="cpu", weights_only=False)
    selected = {"epoch": chosen["epoch"], primary: chosen["metrics"].get(primary)}
    if chosen["epoch"] == final.get("epoch"):  # the last epoch itself: dist holds it
        known = {k: v for k, v in final.items() if k.split("/")[0] in tests}
        selected.update(known or evaluate_tests())
    else:
        dist.load_deployed_state(chosen["distiller"])
        selected.update(evaluate_tests())
    return selected


def save_teacher(path: Path, model: nn.Module, **extra) -> Path:
    """A trained teacher's ``teacher.pt`` (its weights under ``model``, plus ``extra`` entries such as the class
    names): the file a distillation config names as ``teacher.checkpoint``. Both tasks, the CLI and the
    benchmarks write it here."""
    atomic_torch_save({"model": model.state_dict(), **extra}, path)
    return path
