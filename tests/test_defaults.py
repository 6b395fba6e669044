"""One recommended path: ProC-KD's default preset is the one `prockd init`, `build_distiller`, the demo and the README
name, and it carries the loss weights the tables used; detection's default follows its docs."""
from __future__ import annotations

import inspect
from pathlib import Path

import prockd
from prockd.bench.demo import demo_spec
from prockd.classification.init import init_config_text
from prockd.classification.methods.prockd import ProCKDParams
from prockd.detection.methods.prockd import DetProCKDParams
from tests.conftest import TINY_CNN, TINY_VIT

REPO = Path(__file__).resolve().parents[1]
RECOMMENDED = "robust_calibrated"


def test_the_method_init_build_distiller_demo_and_readme_name_one_preset(tmp_path):
    from prockd.classification.folders import write_fashion_mnist_folder

    assert ProCKDParams().preset == RECOMMENDED
    assert ProCKDParams().model_dump() == ProCKDParams(preset=RECOMMENDED).model_dump()
    assert (ProCKDParams().lambda_kl, ProCKDParams().lambda_emb) == (3.0, 3.0)  # the tables' weights, carried
    data = write_fashion_mnist_folder(tmp_path / "d", train_per_class=3, val_per_class=1, test_per_class=1,
                                      unlabeled=0, classes=(0, 1), log=lambda m: None)
    assert f"preset: {RECOMMENDED}" in init_config_text(data, "builtin:efficientnet_lite0", "timm/resnet10t")
    assert inspect.signature(prockd.init_config).parameters["preset"].default == RECOMMENDED
    module = prockd.build_distiller("prockd", teacher=TINY_CNN, student=TINY_VIT, num_classes=4)
    assert module.distiller.params.preset == RECOMMENDED
    rows = {m: p for m, p in demo_spec()["methods"].items() if m.startswith("prockd")}
    assert [p["preset"] for p in rows.values()] == [RECOMMENDED]
    readme = (REPO / "README.md").read_text()
    which = readme[readme.index("## Which method"):readme.index("## Headline")]
    assert f"`preset: {RECOMMENDED}`" in which and f"preset=\"{RECOMMENDED}\"" in readme
    assert len(readme.splitlines()) <= 150 and len(readme.split()) <= 1000


def test_detection_prockd_defaults_to_the_option_its_docs_recommend():
    d = DetProCKDParams()
    assert (d.preset, d.teacher_head, d.lambda_mimic, d.lambda_emb) == ("mimic_light", "none", 0.01, 0.01)
    p = DetProCKDParams(preset="paper")
    assert (p.teacher_head, p.lambda_aug, p.lambda_mimic, p.lambda_emb) == ("shared", 1.0, 1.0, 1.0)
    assert DetProCKDParams(preset="paper", lambda_mimic=0.5).lambda_mimic == 0.5  # keys beside a preset win
    # ProC-KD's default (the row `prockd init --task detection --method prockd` writes) trains as the
    # validation-chosen row of the full table
    from prockd.bench.compare_detection import row_params, tuned_params

    chosen = DetProCKDParams(**tuned_params()["prockd@none"]).model_dump(exclude={"preset"})
    assert DetProCKDParams(**row_params("prockd", tuned_params())).model_dump(exclude={"preset"}) == chosen
    paper = (REPO / "src" / "prockd" / "configs" / "detection" / "paper" / "detector_paper.yaml").read_text()
    assert "preset: paper" in paper  # the paper's reading, set by the paper configs themselves


def test_detection_init_writes_the_method_the_readme_recommends_at_its_chosen_weight():
    """`prockd init --task detection` (and the API) default to the detection row of the README's "Which method"
    table, with the weight the benchmark's validation chose (the tuned file the converged column ran with)."""
    from prockd.api import init_detection_config
    from prockd.bench.compare_detection import tuned_params
    from prockd.detection.init import CWD_WEIGHT, DET_METHOD

    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| detection"))
    assert f"`{DET_METHOD}`" in row.split("|")[2]
    assert inspect.signature(init_detection_config).parameters["method"].default == DET_METHOD
    assert tuned_params("lower26_1font_128_unlabeled")[DET_METHOD] == {"weight": CWD_WEIGHT}
    # the detection demo runs student-only against that same method at that weight
    from prockd.bench.compare_detection import DEMO_METHODS, row_params

    assert DEMO_METHODS == ("student_only", DET_METHOD)
    assert row_params(DET_METHOD, tuned_params()) == {"weight": CWD_WEIGHT}
