"""The package's layering (docs/architecture.md): lower layers never import upper ones, and there are no import
cycles among finetune modules, counting imports inside functions too (a lazy import must not dodge a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "finetune"

# bottom to top; a module may import modules of its own layer or below. Keep in step with docs/architecture.md.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "atomic", "pages", "helpformat"),            # foundations: errors, safe outputs, file pages, --help
    ("ops",),                                               # WKV operators and the kernel loader
    ("models",),                                            # model families and the registry
    ("checkpoint", "tensorfiles", "hf", "tokenizer", "templates", "binidx"),  # files, formats, tokenizers
    ("adapter_format", "adapters", "plugin", "data", "infctx", "quant", "state_files"),  # adapters, data, state
    ("merge", "hf7", "generate", "prepare", "train", "lora", "config", "distributed", "serve"),  # the jobs
    ("cli", "checkpoint_cli", "__init__"),                  # the command line and the package's front door
]


def layer_of(module: str) -> int:
    """module: dotted name inside finetune ('ops.wkv4', 'checkpoint', '__init__')."""
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"finetune.{module} is in no layer: add it to LAYERS here and to docs/architecture.md")


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The finetune modules `name` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1] if node.level > 1 else base
                mod = ".".join(["finetune", *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t != "finetune" and not t.startswith("finetune."):
                continue
            dotted = t.removeprefix("finetune").removeprefix(".")
            # the longest known module this names ('models.family.RNNState' -> 'models.family')
            while dotted and dotted not in known:
                dotted = dotted.rpartition(".")[0]
            found.add(dotted or "__init__")
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    mods.setdefault("__init__", PKG / "__init__.py")
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_lower_layers_never_import_upper_ones():
    bad = []
    for name, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(name):
                bad.append(f"finetune.{name} (layer {layer_of(name)}) imports finetune.{dep} (layer {layer_of(dep)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_low_layers_load_without_the_trainer_or_peft():
    """Importing the ops, the model families and checkpoint I/O pulls in neither Lightning, peft, the trainer nor the
    CLI (checked in a fresh interpreter, so nothing else imported them first)."""
    code = ("import sys; import finetune.ops.wkv4, finetune.ops.wkv6, finetune.ops.wkv7, finetune.models, "
            "finetune.checkpoint; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'peft') "
            "or m.startswith(('finetune.train', 'finetune.lora', 'finetune.cli', 'finetune.merge', "
            "'finetune.generate'))]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
