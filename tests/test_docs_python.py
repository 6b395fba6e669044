"""docs/python.md's examples run as written, in order, in an empty folder (one namespace, as a reader's session)."""
from __future__ import annotations

import os
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def test_python_md_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} example {i + 1}", "exec"), namespace)  # noqa: S102 - the docs' own code
    out = capsys.readouterr().out
    assert "ImageNet weights shipped" in out and "vs_student_only" not in out
    assert os.path.isfile(tmp_path / "my_student.pt") and (tmp_path / "runs" / "compare" / "results.md").is_file()
    assert namespace["top"][0][0]["class"] in namespace["student"].class_names
