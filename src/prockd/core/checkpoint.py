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


PROCKD_BACKBONE = "student.model."  # a prockd run's network inside its distiller / deployed-student state


def read_state_dict(path: str | Path, what: str) -> dict:
    """The state dict saved in ``path``: a ``.safetensors`` file (the format hubs ship), or a torch file (bare, or
    under ``model`` / ``state_dict`` / ``student`` / ``distiller``); DDP's ``module.`` prefixes removed. A prockd run's
    files are read as the network they hold: ``teacher.pt`` (under ``model``), ``student.pt`` (under ``state_dict``)
    and ``checkpoints/best.pt`` / ``last.pt`` (under ``distiller``) give the student network's own tensors (the
    ``student.model.`` prefix removed; a method's training-only modules and ProC-KD's FA are not part of it). Errors
    name ``what`` and the file."""
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
        if not _is_prockd_run_file(p):
            raise ProckdError(f"{what} checkpoint {p} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
        # a prockd run's last.pt holds the optimiser's and the RNG's states beside the weights (not weights-only)
        obj = torch.load(p, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "student", "distiller"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ProckdError(f"{what} checkpoint {p} holds no state dict (a mapping of tensor names to tensors)")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith(PROCKD_BACKBONE) for k in obj):  # a prockd run's student.pt / best.pt / last.pt
        obj = {k[len(PROCKD_BACKBONE):]: v for k, v in obj.items() if k.startswith(PROCKD_BACKBONE)}
    return obj


def _is_prockd_run_file(p: Path) -> bool:
    """Whether ``p`` is a checkpoint inside a prockd run directory (``<run>/checkpoints/last.pt`` beside the run's
    ``config.yaml``): the one non-weights-only file read here, written by prockd itself."""
    return p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file()


def classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict names of a classification network's final classifier: timm's ``get_classifier()`` where the
    model has one, else the last ``nn.Linear`` in module order (torchvision's ``fc`` / ``classifier[-1]`` /
    ``heads.head``, the built-in WRNs' ``fc``). Empty when the network has none."""
    head = None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a model whose get_classifier is not timm's
            head = None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        head = None
        for m in model.modules():
            if isinstance(m, nn.Linear):
                head = m
    if head is None:
        return set()
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


def _shape(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _first(names: list[str], n: int = 2) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def head_classes(model: nn.Module, state: dict) -> int | None:
    """The number of classes of the classifier that ``state`` holds for ``model``'s classifier tensors (None when it
    holds none or they have the model's shape): what a teacher built from another task's checkpoint should have."""
    own = model.state_dict()
    for k in sorted(classifier_keys(model)):
        if k.endswith("weight") and k in state and state[k].shape != own[k].shape \
                and state[k].shape[1:] == own[k].shape[1:]:
            return int(state[k].shape[0])
    return None


def load_checkpoint_into(model: nn.Module, path: str | Path, what: str, state: dict | None = None,
                         new_head: bool = True, head: set[str] | None = None) -> str | None:
    """Load the checkpoint ``path`` (or its already read ``state``, see :func:`read_state_dict`) into ``model``.

    A checkpoint whose classifier (``head``: its state-dict names, default :func:`classifier_keys`; a detector's box
    predictor) differs from the model's only in its number of classes (another task's head) loads
    everything else and leaves the model's new head as created, when ``new_head``; the returned note names the
    tensors (one log line). Anything else that does not fit (a missing, unexpected or wrongly shaped tensor) is one
    line naming ``what``, the file, the counts and the first differing tensors. Returns None when everything loaded."""
    p = Path(path).expanduser()
    state = read_state_dict(p, what) if state is None else dict(state)
    own = model.state_dict()
    shaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    head = (classifier_keys(model) if head is None else head) if new_head else set()
    note, size = None, len(own)
    if shaped and set(shaped) <= head and all(state[k].shape[1:] == own[k].shape[1:] for k in shaped):
        weight = next((k for k in shaped if k.endswith("weight")), shaped[0])
        note = (f"{what} checkpoint {p}: classifier " + ", ".join(f"{k} {_shape(state[k])} -> {_shape(own[k])}"
                                                                 for k in sorted(shaped))
                + f" started new (the checkpoint has {state[weight].shape[0]} classes, this model "
                  f"{own[weight].shape[0]}); every other tensor loaded")
        state = {k: v for k, v in state.items() if k not in shaped}  # the model keeps its new head
        own = {k: v for k, v in own.items() if k not in shaped}
    wrong = state_mismatch(own, state)
    if wrong:
        raise ProckdError(f"{what} checkpoint {p} does not fit the model ({size} tensors): {wrong}: are these the "
                          "weights of this architecture (its name and kwargs)?")
    model.load_state_dict(state, strict=False)
    return note


def state_mismatch(own: dict, state: dict) -> str | None:
    """What keeps ``state`` from loading into a module whose state dict is ``own``, in a few words on one line (the
    counts of tensors of another shape, missing and unexpected, the first of each named), or None when it fits."""
    shaped = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if shaped:
        parts.append(f"{len(shaped)} tensor(s) of another shape ("
                     + ", ".join(f"{k} {_shape(state[k])} vs {_shape(own[k])}" for k in shaped[:2])
                     + (f" and {len(shaped) - 2} more" if len(shaped) > 2 else "") + ")")
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    return "; ".join(parts) or None


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
        wrong = state_mismatch(own, sd)
        if wrong:
            raise ProckdError(f"checkpoint {last} does not fit this config's model ({wrong}): use a new run directory "
                              "(--out) for another model or method")
        dist.load_state_dict(sd)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
    except ProckdError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"checkpoint {last} is unreadable or does not fit this config: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
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
