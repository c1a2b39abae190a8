"""The package's layout guarantees: importing the trainer loads no task, evaluation or experiment code (nor
math_verify), and module-level imports inside trl_bridge run one way (no cycle)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trl_bridge"


def test_importing_bridge_trainer_loads_no_benchmark_grading_or_experiment_code():
    code = ("import sys; from trl_bridge import BridgeTrainer, BridgeConfig; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('trl_bridge', 'math_verify')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "trl_bridge.trainer.bridge_trainer" in loaded
    wings = ("trl_bridge.tasks", "trl_bridge.evaluation", "trl_bridge.experiments", "math_verify")
    assert [m for m in loaded if m.startswith(wings)] == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path) -> set[str]:
    """The trl_bridge modules `path` imports at module level (not inside functions: those are lazy by design)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("trl_bridge"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("trl_bridge"))
    return found


def test_module_level_imports_run_one_way():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in _module_level_imports(p) if i in modules and i != m} for m, p in modules.items()}
    for m in graph:  # a package's __init__ is not an edge back to its modules
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_algorithm_file_stays_the_algorithm():
    """trainer/bridge_trainer.py is Algorithm 2 and the hooks it needs; everything else lives in modules of its own."""
    text = (PACKAGE / "trainer" / "bridge_trainer.py").read_text()
    assert len(text.splitlines()) < 750
    sections = ["# 1. Rollouts", "# 2. Pass A", "# 3. Pass B", "# 4. The three updates", "# 5. The cooperative gain"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
