"""``prockd analyze``: the paper's analysis figures from finished runs and their deployed students.

- Fig. 4 (``attention.png``): Chefer et al. (2021) relevance maps of the 2nd and the last block (and their
  rollout) of each ViT student, on the same test images, ProC-KD beside the baselines (and the teacher when
  it is a ViT);
- Fig. 5 (``prototypes.png``): the distance matrices of the prototypes before and after learning and a
  t-SNE of the learned ones, coloured by the class whose test images attend to each prototype most;
- Fig. 10 (``features_tsne.png``): t-SNE of the deployed students' pooled features on the test images of
  10 (or all) classes, with the silhouette and leave-one-out 5-NN accuracy of those features;
- ``index.html`` shows them together; ``analysis.json`` holds the numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from prockd.analysis.report import write_index
from prockd.classification.attention import (
    lrp_maps,
    student_maps,
    teacher_maps,
    vit_blocks,
)
from prockd.classification.data import build_task
from prockd.classification.models import Teacher, create_model
from prockd.classification.runs import load_run_student
from prockd.core.io import atomic_write_json
from prockd.errors import ProckdError


@dataclass
class RunView:
    """A finished run as the analysis sees it: config, deployed student, label."""

    path: Path
    cfg: object
    dep: object
    label: str
    final: dict = field(default_factory=dict)


def load_run(path: Path) -> RunView:
    """Read a finished run directory (``config.yaml`` and ``student.pt``)."""
    dep, cfg, _ = load_run_student(path)
    final = json.loads((path / "final.json").read_text()) if (path / "final.json").is_file() else {}
    return RunView(path, cfg, dep, f"{cfg.method.name} (seed {cfg.seed})", final)


def pick_images(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` test indices of distinct classes where possible (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    chosen, seen = [], set()
    for i in order.tolist():
        if int(labels[i]) not in seen:
            chosen.append(i)
            seen.add(int(labels[i]))
        if len(chosen) == n:
            break
    for i in order.tolist():  # fewer classes than images: fill with the next ones
        if len(chosen) == n:
            break
        if i not in chosen:
            chosen.append(i)
    return torch.tensor(chosen)


def _grey(img: torch.Tensor) -> np.ndarray:
    x = img.float()
    return (x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)).clamp(0, 1).numpy()


def _overlay(ax, img: torch.Tensor, m: torch.Tensor, title: str) -> None:
    h, w = img.shape[-2:]
    up = F.interpolate(m[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    up = up / up.max().clamp_min(1e-12)
    ax.imshow(_grey(img), cmap="gray")
    ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def figure_attention(runs: list[RunView], images: torch.Tensor, labels: torch.Tensor, names: list[str],
                     out: Path, teacher=None, method: str = "grad-rollout") -> dict:
    """Fig. 4: per ViT run (and ViT teacher) the 2nd-block, last-block and rollout maps on the same images, by
    Chefer et al.'s gradient-weighted rollout (ICCV 2021) or LRP relevance (``method="lrp"``, CVPR 2021; the
    teacher is always drawn with the gradient-weighted rollout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    vits = [r for r in runs if vit_blocks(r.dep.student.model) is not None]
    if not vits:
        return {"skipped": "no run has a ViT student (Fig. 4 explains ViT attention); students here: "
                           + ", ".join(sorted({r.cfg.student.name for r in runs}))}
    cols = [("input", None, None)]
    info: dict = {"images": len(images), "method": method, "runs": {}}
    for r in vits:
        maps = lrp_maps(r.dep, images) if method == "lrp" else student_maps(r.dep, images)
        nb = len(maps.blocks)
        second = min(1, nb - 1)
        cols += [(f"{r.label}\nblock {second + 1}", maps.blocks[second], maps.target),
                 (f"{r.label}\nblock {nb} (last)", maps.blocks[-1], maps.target),
                 (f"{r.label}\nrollout", maps.rollout, maps.target)]
        info["runs"][r.label] = {"blocks": nb, "correct": int((maps.target == labels).sum())}
    if teacher is not None and vit_blocks(teacher.model) is not None:
        tm = teacher_maps(teacher, images)
        nb = len(tm.blocks)
        cols += [(f"teacher\nblock {min(2, nb)}", tm.blocks[min(1, nb - 1)], None),
                 (f"teacher\nblock {nb} (last)", tm.blocks[-1], None)]
        info["teacher"] = {"blocks": nb}
    fig, axes = plt.subplots(len(images), len(cols), figsize=(1.45 * len(cols), 1.5 * len(images)), squeeze=False)
    for i in range(len(images)):
        for j, (title, maps, tgt) in enumerate(cols):
            ax = axes[i, j]
            if maps is None:
                ax.imshow(_grey(images[i]), cmap="gray")
                ax.set_title(f"{title}: {names[int(labels[i])]}" if i == 0 else names[int(labels[i])], fontsize=7)
                ax.axis("off")
                continue
            pred = "" if tgt is None else f" → {names[int(tgt[i])]}{'' if int(tgt[i]) == int(labels[i]) else ' ✗'}"
            _overlay(ax, images[i], maps[i], (title if i == 0 else "") + pred)
    what = ("LRP relevance (CVPR)" if method == "lrp" else "gradient-weighted relevance (ICCV)")
    fig.suptitle(f"Chefer et al. 2021 {what}; explained class: the prediction", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return info


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x)


def prototype_classes(dep, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """For each prototype, the class whose test images give it the most FA attention mass (per image of the class)."""
    mass = torch.zeros(num_classes, dep.prototypes.shape[0])
    count = torch.zeros(num_classes)
    with torch.no_grad():
        for s in range(0, len(images), 256):
            tok, _, _ = dep.student.features(images[s:s + 256])
            _, _, a = dep.fa.attention(tok, dep.prototypes)
            y = labels[s:s + 256]
            mass.index_add_(0, y, a.mean(1).float())
            count.index_add_(0, y, torch.ones(len(y)))
    return (mass / count.clamp_min(1)[:, None]).argmax(0).numpy()


def figure_prototypes(run: RunView, images, labels, names, out: Path, seed: int) -> dict:
    """Fig. 5: Euclidean distance matrices of the prototypes before / after learning, t-SNE of the learned ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if getattr(run.dep, "prototypes", None) is None:
        return {"skipped": f"{run.label} has no prototypes (not a ProC-KD run)"}
    after = run.dep.prototypes.detach().float()
    init_file = run.path / "prototypes_init.pt"
    if not init_file.is_file():
        return {"skipped": f"{init_file} is missing (written at the start of ProC-KD runs)"}
    before = torch.load(init_file, map_location="cpu", weights_only=True).float()
    if before.shape != after.shape:
        raise ProckdError(f"{init_file} holds {tuple(before.shape)} prototypes, student.pt {tuple(after.shape)}")
    d0, d1 = torch.cdist(before, before), torch.cdist(after, after)
    k = after.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    owner = prototype_classes(run.dep, images, labels, len(names))
    emb = _tsne(after.numpy(), seed)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    vmax = float(max(d0.max(), d1.max()))
    for ax, d, t in ((axes[0], d0, "before learning"), (axes[1], d1, "after learning")):
        im = ax.imshow(d.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"prototype distances, {t}\n(mean {float(d[off].mean()):.3f}, std {float(d[off].std()):.3f})",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for c in sorted(set(owner.tolist())):
        sel = owner == c
        axes[2].scatter(emb[sel, 0], emb[sel, 1], s=22, color=cmap(c % cmap.N), label=names[c])
    axes[2].set_title(f"t-SNE of the {k} learned prototypes\n(colour: class attending to it most)", fontsize=9)
    axes[2].legend(fontsize=6, ncol=2, markerscale=0.7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes[2].set_xticks([]), axes[2].set_yticks([])
    fig.suptitle(run.label, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return {"prototypes": k, "mean_distance_before": float(d0[off].mean()), "mean_distance_after": float(d1[off].mean()),
            "drift": float((after - before).norm() / before.norm().clamp_min(1e-12)),
            "classes_owning_a_prototype": len(set(owner.tolist()))}


def feature_metrics(x: np.ndarray, y: np.ndarray) -> dict:
    """Silhouette (cosine) and leave-one-out 5-NN accuracy of features ``x`` with labels ``y``."""
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=6, metric="cosine").fit(x, y)
    idx = knn.kneighbors(x, return_distance=False)[:, 1:]  # drop the point itself
    votes = np.array([np.bincount(y[r], minlength=y.max() + 1).argmax() for r in idx])
    return {"silhouette_cosine": float(silhouette_score(x, y, metric="cosine")),
            "knn5_accuracy": float(100 * (votes == y).mean())}


def figure_features(runs: list[RunView], images, labels, names, out: Path, classes: int, seed: int,
                    per_class: int = 100) -> dict:
    """Fig. 10: t-SNE of each deployed student's pooled features on the test images of ``classes`` classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep_classes = list(range(len(names))) if classes <= 0 else list(range(min(classes, len(names))))
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in keep_classes])
    x, y = images[idx], labels[idx].numpy()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab20" if len(keep_classes) > 10 else "tab10")
    info = {"classes": [names[c] for c in keep_classes], "points": int(len(idx)), "runs": {}}
    for ax, r in zip(axes[0], runs):
        with torch.no_grad():
            f = torch.cat([r.dep.pooled(x[s:s + 256]).float() for s in range(0, len(x), 256)]).numpy()
            pred = torch.cat([r.dep(x[s:s + 256]).argmax(-1) for s in range(0, len(x), 256)]).numpy()
        emb = _tsne(f, seed)
        m = feature_metrics(f, y)
        m["accuracy"] = float(100 * (pred == y).mean())
        info["runs"][r.label] = m
        for c in keep_classes:
            sel = y == c
            ax.scatter(emb[sel, 0], emb[sel, 1], s=5, alpha=0.6, color=cmap(c % cmap.N), label=names[c])
        ax.set_title(f"{r.label}\nsilhouette {m['silhouette_cosine']:.3f}, 5-NN {m['knn5_accuracy']:.1f} %, "
                     f"top-1 {m['accuracy']:.1f} %", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, -1].legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return info


def run_analyze(run: Path, compare: list[Path], out: Path | None = None, images: int = 4, classes: int = 10,
                attention: str = "grad-rollout", seed: int = 0, log=print) -> Path:
    """Draw Fig. 4 / 5 / 10 for ``run`` (and ``compare`` runs beside it) into ``out`` with an index page."""
    if attention not in ("grad-rollout", "lrp"):
        raise ProckdError(f"unknown attention method '{attention}' (grad-rollout or lrp)")
    main = load_run(run)
    others = [load_run(p) for p in compare]
    runs = [main] + others
    labels_seen = {}
    for r in runs:
        if r.label in labels_seen:
            r.label = f"{r.label} [{r.path.name}]"
        labels_seen[r.label] = r
    log(f"analyze: {len(runs)} run(s); building the test data of {run}")
    task = build_task(main.cfg.data)
    for r in others:
        if r.dep.class_names and r.dep.class_names != task.class_names:
            raise ProckdError(f"{r.path} predicts other classes than {run} ({len(r.dep.class_names)} vs "
                              f"{len(task.class_names)}): compare runs of the same task")
    test_name, ds = next(iter(task.tests.items()))
    x = ds.take(torch.arange(len(ds))).float() / 255.0
    y = ds.labels
    names = task.class_names
    out = out or (run / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    summary: dict = {"test_set": test_name, "runs": {r.label: str(r.path) for r in runs}}
    sections = []

    log("analyze: Fig. 4 attention maps")
    pick = pick_images(y, images, seed)
    teacher = None
    if main.cfg.method.name != "student_only" and main.cfg.teacher.name and not main.cfg.teacher.name.startswith("builtin:"):
        try:
            if timm.is_model(main.cfg.teacher.name):
                m = create_model(main.cfg.teacher, None, "teacher")
                if vit_blocks(m) is not None:
                    teacher = Teacher(m, main.cfg.teacher, need_embed=False)
        except Exception as e:  # noqa: BLE001 - the teacher's maps are optional; say why they are missing
            log(f"analyze: teacher maps not drawn: {type(e).__name__}: {str(e)[:200]}")
    summary["attention"] = figure_attention(runs, x[pick], y[pick], names, out / "attention.png", teacher,
                                            attention)
    if "skipped" in summary["attention"]:
        log(f"analyze: Fig. 4 skipped: {summary['attention']['skipped']}")
    sections.append(("Fig. 4: attention relevance (Chefer et al. 2021)",
                     None if "skipped" in summary["attention"] else "attention.png",
                     json.dumps(summary["attention"], indent=1)))

    log("analyze: Fig. 5 prototypes")
    summary["prototypes"] = {}
    for r in runs:
        if getattr(r.dep, "prototypes", None) is None:
            continue
        name = f"prototypes_{len(summary['prototypes'])}.png"
        res = figure_prototypes(r, x, y, names, out / name, seed)
        if "skipped" in res:
            log(f"analyze: Fig. 5 of {r.label} skipped: {res['skipped']}")
        summary["prototypes"][r.label] = res
        sections.append((f"Fig. 5: prototypes of {r.label}", None if "skipped" in res else name,
                         json.dumps(res, indent=1)))
    if not summary["prototypes"]:
        log("analyze: Fig. 5 skipped: no ProC-KD run among the runs given (prototypes are ProC-KD's)")
        sections.append(("Fig. 5: prototypes", None, "no ProC-KD run among the runs given"))

    log("analyze: Fig. 10 feature t-SNE")
    summary["features"] = figure_features(runs, x, y, names, out / "features_tsne.png", classes, seed)
    sections.append(("Fig. 10: t-SNE of the deployed students' features", "features_tsne.png",
                     json.dumps(summary["features"], indent=1)))
    atomic_write_json(out / "analysis.json", summary)
    index = write_index(out, f"prockd analysis of {run}", sections)
    log(f"analyze: wrote {index}")
    return index
