"""COCO metrics of a detector (faster-coco-eval, a drop-in COCOeval) and the COCO error analysis of Fig. 11.

- :func:`coco_metrics`: AP, AP50, AP75, APs/m/l (Tables 5, 6) and per-class AP50 with their mean (Tables 2, 3:
  the mean over classes that have ground truth);
- :func:`error_analysis`: the PR curves C75, C50, Loc, Sim, Oth, BG, FN per area, as mmdet's
  ``coco_error_analysis.py`` defines them (``detection.md``); :func:`plot_error_analysis` draws them.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from prockd.core.loop import autocast

AREAS = ("all", "small", "medium", "large")
ERROR_CURVES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")


def _quiet(*_a, **_k) -> None:
    pass


def _coco(gt: dict):
    from faster_coco_eval import COCO

    return COCO(copy.deepcopy(gt), print_function=_quiet)


def _evaluate(gt: dict, dets: list[dict], iou_thrs=None, max_dets=None):
    """A finished COCOeval (None when there are no detections at all)."""
    from faster_coco_eval import COCOeval_faster

    g = _coco(gt)
    if not dets:
        return None
    d = g.loadRes(copy.deepcopy(dets))
    e = COCOeval_faster(g, d, "bbox", print_function=_quiet)
    if iou_thrs is not None:
        e.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    if max_dets is not None:
        e.params.maxDets = list(max_dets)
    e.evaluate()
    e.accumulate()
    if iou_thrs is None and max_dets is None:
        e.summarize()
    return e


def _mean_valid(p: np.ndarray) -> float:
    v = p[p > -1]
    return float(v.mean()) if v.size else float("nan")


def coco_metrics(gt: dict, dets: list[dict]) -> dict[str, float]:
    """AP metrics in percent: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AP50/<class>`` and
    ``mAP50`` (mean of the per-class AP50 over classes with ground truth; NaN-free)."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    with_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
    e = _evaluate(gt, dets)
    out: dict[str, float] = {}
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if e is None:
        out.update({k: 0.0 for k in keys})
        per = {cid: 0.0 for cid in names}
    else:
        for k, v in zip(keys, e.stats[:6]):
            out[k] = 100.0 * max(0.0, float(v))
        prec = e.eval["precision"]  # T x R x K x A x M
        per = {}
        for ki, cid in enumerate(e.params.catIds):
            per[cid] = 100.0 * max(0.0, _mean_valid(prec[0, :, ki, 0, -1])) if cid in with_gt else float("nan")
    for cid, name in names.items():
        if cid in with_gt:
            out[f"AP50/{name}"] = per.get(cid, 0.0)
    vals = [out[f"AP50/{names[c]}"] for c in names if c in with_gt]
    out["mAP50"] = float(np.mean(vals)) if vals else 0.0
    return out


@torch.no_grad()
def detect(model, ds, device, batch_size: int = 8, amp: str = "none", indices=None) -> list[dict]:
    """COCO-format detections (``bbox`` xywh, ``score``, ``category_id`` = label) of ``model`` on ``ds``."""
    model.eval()
    idx = list(range(len(ds))) if indices is None else list(indices)
    out = []
    for i in range(0, len(idx), batch_size):
        chunk = idx[i:i + batch_size]
        images = [ds.load_image(j).to(device) for j in chunk]
        with autocast(device, amp):
            preds = model(images)
        for j, p in zip(chunk, preds):
            b = p["boxes"].float().cpu()
            for box, s, lab in zip(b.tolist(), p["scores"].float().cpu().tolist(), p["labels"].cpu().tolist()):
                out.append({"image_id": ds.records[j].image_id, "category_id": int(lab),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(s)})
    return out


def _precision_with_ignored(gt: dict, dets: list[dict], cat: int, others: set[int], k: int) -> np.ndarray:
    """PR at IoU 0.1 of category ``cat`` when ground truth of categories ``others`` counts as ignored
    (crowd) boxes of ``cat`` (``R x A`` for maxDet 100)."""
    g = copy.deepcopy(gt)
    for a in g["annotations"]:
        if a["category_id"] in others:
            a["category_id"] = cat
            a["iscrowd"] = 1
    e = _evaluate(g, [d for d in dets if d["category_id"] == cat], iou_thrs=[0.1], max_dets=[100])
    if e is None:
        return np.zeros((101, len(AREAS)))
    return e.eval["precision"][0, :, k, :, 0]


def error_analysis(gt: dict, dets: list[dict]) -> dict:
    """Fig. 11: PR curves ``7 x R x K x A`` (C75, C50, Loc, Sim, Oth, BG, FN) and their areas under the curve
    averaged over categories, per area range."""
    cats = [c["id"] for c in gt["categories"]]
    sup = {c["id"]: c.get("supercategory", c["name"]) for c in gt["categories"]}
    e = _evaluate(gt, dets, iou_thrs=[0.75, 0.5, 0.1], max_dets=[100])
    ps = np.zeros((7, 101, len(cats), len(AREAS)))
    if e is not None:
        ps[:3] = e.eval["precision"][:, :, :, :, 0]
        for k, cid in enumerate(cats):
            same = {c for c in cats if c != cid and sup[c] == sup[cid]}
            ps[3, :, k] = _precision_with_ignored(gt, dets, cid, same, k)
            ps[4, :, k] = _precision_with_ignored(gt, dets, cid, set(cats) - {cid}, k)
        ps[5] = (ps[4] > 0).astype(float)
    ps[6] = 1.0
    ps = np.where(ps < 0, 0.0, ps)
    summary = {area: {name: float(ps[i, :, :, a].mean()) for i, name in enumerate(ERROR_CURVES)}
               for a, area in enumerate(AREAS)}
    return {"precision": ps, "summary": summary}


def plot_error_analysis(result: dict, path, title: str = "") -> None:
    """The stacked PR-curve figure (one panel per area range), mmdet's colours and legend form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = result["precision"].mean(axis=2)  # 7 x R x A
    rs = np.linspace(0, 1, 101)
    colors = [(1, 1, 1), (0.31, 0.51, 0.74), (0.75, 0.31, 0.30), (0.36, 0.90, 0.38), (0.50, 0.39, 0.64),
              (1, 0.6, 0), (0.7, 0.7, 0.7)]
    fig, axes = plt.subplots(1, len(AREAS), figsize=(4 * len(AREAS), 3.6))
    for a, ax in enumerate(axes):
        prev = np.zeros(101)
        for i, name in enumerate(ERROR_CURVES):
            cur = ps[i, :, a]
            ax.plot(rs, cur, color="k", linewidth=0.5)
            ax.fill_between(rs, prev, cur, color=colors[i], label=f"[{cur.mean():.3f}] {name}")
            prev = cur
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("recall")
        ax.set_title(f"{title} {AREAS[a]}".strip())
        ax.legend(loc="lower left", fontsize=7)
    axes[0].set_ylabel("precision")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
