"""Every research comparison spec (``docs/research/specs``: kept in the repository, out of the package) loads and every one of its runs' configs validates (the
students, columns with their recipe keys, and methods with their parameters), before anyone spends an hour on it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prockd.bench import compare
from prockd.bench.suites import get_suite
from prockd.classification.config import build_config
from prockd.errors import ProckdError

SPEC_DIR = Path(__file__).resolve().parents[1] / "docs" / "research" / "specs"
SPECS = sorted(SPEC_DIR.glob("*.yaml"))


def _base(spec: dict) -> dict:
    return compare.suite_base(spec, "teacher.pt", Path("cache"))  # the compare's own base; no teacher is loaded


def _validate(spec: dict, name: str) -> int:
    base, n = _base(spec), 0
    for student in spec["students"]:
        for setting in spec["settings"]:
            for method, params in spec["methods"].items():
                raw = compare.run_config(spec, base, student, setting, method, params, compare.final_seeds(spec)[0])
                compare.method_params(build_config(raw, f"{name} {student}/{setting}/{method}"))
                n += 1
    return n


def test_the_shipped_specs_are_there():
    names = {p.name for p in SPECS}
    assert {"robust.yaml", "robust_screen.yaml", "robust_control.yaml", "cross_design.yaml", "long_tail.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_run_of_a_shipped_spec_validates(path):
    spec = compare.load_spec(path)
    own = yaml.safe_load(path.read_text())
    assert _validate(spec, path.name) > 0
    for key in ("methods", "settings", "students"):  # the file's own rows and columns are the ones validated
        if key in own:
            assert list(spec[key]) == list(own[key]), key


def test_the_robustness_columns_carry_their_recipe_into_every_method():
    spec = compare.load_spec(SPEC_DIR / "robust_control.yaml")
    base = _base(spec)
    for method, params in spec["methods"].items():
        noisy = compare.run_config(spec, base, "wrn16-1", "standard+noise0.2sym", method, params, 20)
        clean = compare.run_config(spec, base, "wrn16-1", "standard", method, params, 20)
        assert noisy["train"]["student_noise"] == 0.2 and noisy["train"]["student_noise_teacher"] == "noisy"
        assert "student_noise" not in clean["train"]
        assert {k: v for k, v in noisy["train"].items() if not k.startswith("student_noise")} == clean["train"]
        assert noisy["data"] == clean["data"]  # the recipe key is not a data key


def test_a_misspelt_recipe_key_in_a_column_is_an_error_naming_it():
    spec = compare.load_spec(extra={"settings": {"standard+noise": {"train": {"student_nois": 0.2}}},
                                    "methods": {"student_only": {}}, "students": {"wrn16-1": get_suite("glyphs").students["wrn16-1"]}})
    with pytest.raises(ProckdError, match="student_nois"):
        _validate(spec, "spec")


def test_a_students_own_recipe_reaches_every_row_under_the_columns_and_rows_own():
    """A student entry's ``train`` (its family's recipe: glyphs_vit's ViT students, AdamW 1e-3) sets that student's
    runs; a column's ``train`` and a row's ``train`` still win over it; the model config keeps no ``train`` key."""
    spec = compare.load_spec(suite="glyphs_vit")
    base = compare.suite_base(spec, "teacher.pt", Path("/tmp/cache"))
    vit = compare.run_config(spec, base, "vit-d6", "standard", "student_only", {}, 0)
    wrn = compare.run_config(spec, base, "wrn16-1", "standard", "student_only", {}, 0)
    assert vit["train"]["lr"] == 1e-3 and wrn["train"]["lr"] == 3e-3 and "train" not in vit["student"]
    assert vit["student"]["init_from_teacher"] is True and vit["student"]["kwargs"]["depth"] == 6
    spec["settings"]["standard"] = {"train": {"lr": 5e-4}}
    assert compare.run_config(spec, base, "vit-d6", "standard", "student_only", {}, 0)["train"]["lr"] == 5e-4
    row = compare.run_config(spec, base, "vit-d6", "standard", "kd", {"train": {"lr": 2e-4}}, 0)
    assert row["train"]["lr"] == 2e-4
