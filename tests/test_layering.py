"""The package's layers: models and data at the bottom, then checkpoint and sampling (the Python
API among them), then evaluate, train and serve, then the commands. Nothing imports a layer
above its own (imports inside functions included), no library module imports a command module,
and the imports (those inside functions included) form no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medv_jax"

LAYERS = {  # first matching prefix wins
    "medv_jax.user_errors": 0, "medv_jax.models": 0, "medv_jax.data": 0, "medv_jax.sharding": 0,
    "medv_jax.checkpoint": 1, "medv_jax.sampling": 1,
    "medv_jax.evaluate": 2, "medv_jax.train": 2, "medv_jax.serve": 2,
}
COMMAND = 3


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_command(name: str, tree: ast.Module) -> bool:
    """``__main__`` modules, the ``cli`` modules and every module that runs as ``python -m``."""
    leaf = name.rsplit(".", 1)[-1]
    runs = any(
        isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
        for node in tree.body
    )
    return leaf in ("__main__", "cli") or runs


def layer(name: str, commands: set[str]) -> int:
    if name in commands:
        return COMMAND
    for prefix, level in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return level
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def imports(tree: ast.Module, name: str, known: set[str], top_level_only: bool) -> set[str]:
    """The package's modules ``tree`` imports (``from pkg import mod`` resolves to the module)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medv_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medv_jax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {m for m in found if m != "medv_jax"}


def package_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def test_nothing_imports_upward_nor_a_command():
    modules = package_modules()
    known = set(modules)
    commands = {n for n, t in modules.items() if is_command(n, t)}
    assert {"medv_jax.sampling.cli", "medv_jax.sampling.infer", "medv_jax.serve.api",
            "medv_jax.evaluate.__main__"} <= commands
    upward = []
    for name, tree in modules.items():
        if name == "medv_jax":  # the package root only forwards medv_jax.load
            continue
        own = layer(name, commands)
        for target in imports(tree, name, known, top_level_only=False):
            if target in known and layer(target, commands) > own:
                upward.append(f"{name} (layer {own}) imports {target} (layer {layer(target, commands)})")
    assert not upward, "\n".join(sorted(upward))


def test_imports_form_no_cycle():
    modules = package_modules()
    known = set(modules)
    graph = {n: imports(t, n, known, top_level_only=False) & known for n, t in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_one_model_loader():
    """Only the Python API calls load_pretrained to build a model for answering."""
    callers = sorted(
        name for name, tree in package_modules().items()
        if any(isinstance(n, ast.Attribute) and n.attr == "load_pretrained" for n in ast.walk(tree))
        or any(isinstance(n, ast.Name) and n.id == "load_pretrained" for n in ast.walk(tree))
    )
    answering = [c for c in callers if c.startswith(("medv_jax.sampling", "medv_jax.serve", "medv_jax.evaluate"))]
    assert answering == ["medv_jax.sampling.api"], callers
