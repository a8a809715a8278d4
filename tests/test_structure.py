"""The package's shape: no import cycle (between modules, nor between subpackages), no module over
the size limit, and no import inside a function except of an optional heavy dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "safemoe_jax"
MAX_LINES = 500
# Imported inside the function that needs them, each for a reason: heavy at import time and
# needed by one optional path only.
LAZY_OK = {
    "torch": "tests' reference only; never imported by the package at module level",
    "matplotlib": "plots only (loss curves, report figures); 0.5 s to import",
    "tensorboardX": "TensorBoard logging only (log.tensorboard); 2 s to import",
    "wandb": "Weights & Biases only (log.wandb_project); an optional install",
    "datasets": "Hub data sources only; 1 s to import",
    "httpx": "the API judge only",
}


def modules(root: Path = ROOT / PKG) -> dict[str, Path]:
  """Dotted module name -> file, for every .py file of the package."""
  out = {}
  for f in sorted(root.rglob("*.py")):
    parts = list(f.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = f
  return out


def _resolve(node: ast.ImportFrom, name: str, is_pkg: bool) -> str:
  if not node.level:
    return node.module or ""
  base = name.split(".") if is_pkg else name.split(".")[:-1]
  base = base[:len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
  """(package modules imported anywhere in the file, [(line, module)] of imports made inside a
  function). `from a.b import c` is an import of a.b.c when that is a module, else of a.b."""
  tree = ast.parse(path.read_text(), str(path))
  is_pkg = path.name == "__init__.py"
  inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
  edges, lazy = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mod = _resolve(node, name, is_pkg)
      targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
    else:
      continue
    for t in targets:
      if id(node) in inner:
        lazy.append((node.lineno, t))
      while t and t not in known and t.startswith(PKG + "."):
        t = t.rpartition(".")[0]  # `import a.b.c` of a name inside a.b: the module a.b
      if t in known and t != name:
        edges.add(t)
  return edges, lazy


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {m: imports(m, p, set(mods))[0] for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the directed graph as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  path: list[str] = []

  def visit(n: str) -> list[str] | None:
    state[n] = 1
    path.append(n)
    for m in sorted(g.get(n, ())):
      if state.get(m) == 1:
        return path[path.index(m):] + [m]
      if m not in state and (c := visit(m)):
        return c
    state[n] = 2
    path.pop()
    return None

  for n in sorted(g):
    if n not in state and (c := visit(n)):
      return c
  return None


def package_of(module: str) -> str:
  """The subpackage a module belongs to (core, io, data, ...); `errors` and `log` stand alone,
  and the entry points (`python -m safemoe_jax[.<command>]`) belong to the CLI."""
  parts = module.split(".")
  if len(parts) == 1 or parts[-1] == "__main__":
    return "cli"
  if len(parts) == 2 and parts[1] not in ("errors", "log"):
    return parts[1] if (ROOT / PKG / parts[1]).is_dir() else "cli"
  return parts[1]


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_the_import_parser_sees_module_and_function_level_imports(tmp_path):
  pkg = tmp_path / PKG
  (pkg / "sub").mkdir(parents=True)
  for f in ("__init__.py", "sub/__init__.py", "sub/a.py", "b.py"):
    (pkg / f).write_text("")
  (pkg / "sub" / "a.py").write_text("from safemoe_jax import b\nfrom . import a\n"
                                    "def f():\n  import torch\n  from safemoe_jax.sub.a import x\n")
  mods = modules(pkg)
  assert set(mods) == {PKG, f"{PKG}.sub", f"{PKG}.sub.a", f"{PKG}.b"}
  edges, lazy = imports(f"{PKG}.sub.a", mods[f"{PKG}.sub.a"], set(mods))
  assert edges == {f"{PKG}.b"}  # itself is not an edge
  assert lazy == [(4, "torch"), (5, f"{PKG}.sub.a")]


def test_no_import_cycle_between_modules():
  cycle = find_cycle(graph())
  assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
  g: dict[str, set[str]] = {}
  for m, deps in graph().items():
    g.setdefault(package_of(m), set()).update(package_of(d) for d in deps)
  for p in g:
    g[p].discard(p)
  cycle = find_cycle(g)
  assert cycle is None, " -> ".join(cycle)


def test_no_module_over_the_size_limit():
  big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_imports_inside_functions_are_only_optional_heavy_dependencies():
  mods = modules()
  bad = [f"{mods[m].relative_to(ROOT)}:{line}: {t}" for m in mods
         for line, t in imports(m, mods[m], set(mods))[1] if t.split(".")[0] not in LAZY_OK]
  assert not bad, "imports inside functions (move them to the top of the module):\n" + \
      "\n".join(bad)


# The only `python -m` entry points: the package (`python -m safemoe_jax <command>`, the same
# dispatcher as the `safemoe` console script) and `python -m safemoe_jax.train` (our users' habit).
ENTRY_POINTS = {PKG, f"{PKG}.train"}
CMDS = ["train", "evaluate", "judge", "data", "curate", "experiment", "export", "generate", "bench",
        "assets", "audit", "report", "accel_check"]


def entry_points(root: Path = ROOT / PKG) -> set[str]:
  """Modules `python -m` runs: a package with a __main__.py, or a module that checks
  `__name__ == "__main__"`."""
  out = set()
  for m, f in modules(root).items():
    if m.endswith(".__main__"):
      out.add(m.removesuffix(".__main__"))
    elif re.search(r"^if __name__ == .__main__.:", f.read_text(), re.M):
      out.add(m)
  return out


def test_the_entry_point_finder_sees_a_shim_and_a_package_main(tmp_path):
  pkg = tmp_path / PKG
  (pkg / "train").mkdir(parents=True)
  for f in ("__init__.py", "__main__.py", "train/__init__.py", "train/__main__.py", "errors.py"):
    (pkg / f).write_text("")
  assert entry_points(pkg) == ENTRY_POINTS
  (pkg / "judge.py").write_text('import sys\nif __name__ == "__main__":\n  sys.exit(0)\n')
  (pkg / "data").mkdir()
  (pkg / "data" / "__main__.py").write_text("")
  assert entry_points(pkg) == ENTRY_POINTS | {f"{PKG}.judge", f"{PKG}.data"}


def test_one_command_surface():
  """`safemoe <command>` = `python -m safemoe_jax <command>`; no per-command shim modules
  (`python -m safemoe_jax.train` aside); every command a module of cli/ whose parser comes from
  cli/args; `safemoe --help` lists them all."""
  from safemoe_jax import cli
  assert sorted(cli.COMMANDS) == sorted(CMDS)
  assert entry_points() == ENTRY_POINTS, "shims other than python -m safemoe_jax.train"
  root = {f.stem for f in (ROOT / PKG).glob("*.py")}
  assert root == {"__init__", "__main__", "errors", "log"}, root
  for c in CMDS:
    text = (ROOT / PKG / "cli" / f"{c}.py").read_text()
    assert "ArgumentParser(" not in text and "parser(" in text, f"cli/{c}.py: use cli.args.parser"
    assert f"  {c} " in cli.usage()


def test_docs_name_only_existing_entry_points():
  """`python -m safemoe_jax.<x>` in the README, docs, configs, launch scripts, tests or the
  package's texts names an entry point that exists."""
  texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "configs").glob("*.yaml")), *sorted((ROOT / "launch").glob("*")),
           *sorted((ROOT / PKG).rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
  bad = sorted({(t.relative_to(ROOT).as_posix(), f"{PKG}.{m}") for t in texts for m in
                 re.findall(r"""-m["', ]+safemoe_jax\.(\w+)""", t.read_text())
                 if f"{PKG}.{m}" not in ENTRY_POINTS})
  assert not bad, bad


def test_imports_in_the_notebook_docs_and_launch_scripts_exist():
  """`from safemoe_jax[.x] import y` in the notebook, the docs and the launch scripts names a
  module or a top-level name that exists (the notebook imported a command shim that was removed)."""
  texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "launch").glob("*"))]
  bad = []
  for t in texts:
    for sub, names in re.findall(r"from safemoe_jax((?:\.\w+)*) import ([\w, ]+)", t.read_text()):
      base = ROOT / PKG / Path(*sub.strip(".").split(".")) if sub else ROOT / PKG
      for name in (n.strip() for n in names.split(",") if n.strip()):
        module = base.with_suffix(".py")
        defined = module.exists() and re.search(rf"^(def|class) {name}\b|^{name}\b.*=",
                                                module.read_text(), re.M)
        if not ((base / f"{name}.py").exists() or (base / name / "__init__.py").exists()
                or defined):
          bad.append((t.relative_to(ROOT).as_posix(), f"safemoe_jax{sub}", name))
  assert not bad, bad


def test_every_config_file_the_docs_name_exists():
  """A `configs/<name>.yaml` named in the README, the docs, a config's comments, the launch scripts or the
  package's help texts is a file of the repository (a renamed or never-written config is caught here)."""
  texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "configs").glob("*.yaml")), *sorted((ROOT / PKG).rglob("*.py")),
           *sorted((ROOT / "launch").glob("*"))]
  named = {(t.relative_to(ROOT).as_posix(), m) for t in texts
           for m in re.findall(r"configs/([A-Za-z0-9_.-]+\.yaml)", t.read_text())}
  missing = sorted((src, f"configs/{m}") for src, m in named if not (ROOT / "configs" / m).exists())
  assert named and not missing, missing
