"""The import rules of docs/architecture.md, read from the source: every `import` and `from ... import` under
moemesh/, services/ and bench/, those inside functions included."""

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("moemesh", "services", "bench")
PROJECT = ("moemesh", "services", "bench", "tests")  # the top-level names that are this repository's


@dataclass(frozen=True)
class Rule:
    """Modules under `source` may import, of this repository, only what starts with one of `allowed`."""

    source: str
    allowed: tuple[str, ...]
    why: str


RULES = (
    Rule("moemesh.v1", ("moemesh.v1",), "generated code imports only itself"),
    Rule("moemesh.demo_bot", ("moemesh.demo_bot",), "the demo bot's training stands alone"),
    Rule(
        "moemesh.client",
        ("moemesh.client", "moemesh.v1", "moemesh.errors", "moemesh.rpc", "moemesh.tls"),
        "the client imports only the generated protos, errors, gRPC plumbing and TLS",
    ),
    Rule("moemesh", ("moemesh",), "moemesh must not import services, bench or tests"),
    Rule("services.experts", ("moemesh", "services.experts"), "an expert service imports only moemesh"),
    Rule("services.router", ("moemesh", "services.router"), "a router imports only moemesh"),
    Rule(
        "services.gateway",
        ("moemesh", "services.gateway", "services.router"),
        "the gateway imports moemesh and the router's code (for --routers 0), never the expert service",
    ),
    Rule("bench", ("moemesh", "services", "bench"), "benchmarks must not import tests"),
)

# (file, imported module): imports a rule forbids that are allowed for now, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, statement) of every import in the file, relative ones resolved; `from a import b` gives
    `a.b`, which is either a submodule or a name in `a`: either way it starts with `a`."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                module = base if alias.name == "*" else f"{base}.{alias.name}"
                found.append((node.lineno, module, f"from {'.' * node.level}{node.module or ''} import {alias.name}"))
    return found


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rule_for(module: str) -> Rule | None:
    """The most specific rule whose source holds `module` (RULES lists subpackages before their package)."""
    return next((rule for rule in RULES if under(module, rule.source)), None)


def sources() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def project_imports() -> list[tuple[str, int, str, str, Rule | None]]:
    """(file, line, imported module, statement, the rule of the importing file) for every import of this
    repository."""
    found = []
    for path in sources():
        rule = rule_for(module_name(path))
        for line, module, statement in imported(path):
            if module.split(".")[0] in PROJECT:
                found.append((str(path.relative_to(ROOT)), line, module, statement, rule))
    return found


def test_imports_follow_the_rules():
    assert len(sources()) > 50, f"too few files found under {SCANNED} in {ROOT}"
    broken = []
    for file, line, module, statement, rule in project_imports():
        if rule is None or any(under(module, allowed) for allowed in rule.allowed):
            continue
        if any(file == f and under(module, m) for f, m in EXCEPTIONS):
            continue
        broken.append(
            f"{file}:{line} `{statement}`: {rule.source} may import only {', '.join(rule.allowed)} ({rule.why})"
        )
    assert not broken, "imports that break docs/architecture.md's rules:\n" + "\n".join(broken)


def test_every_allowed_exception_still_exists():
    """An exception whose import is gone must leave EXCEPTIONS (and docs/architecture.md) too."""
    seen = {(file, module) for file, _, module, _, _ in project_imports()}
    stale = [
        f"{file} no longer imports {module}: remove it from EXCEPTIONS and from docs/architecture.md"
        for file, module in EXCEPTIONS
        if not any(f == file and under(m, module) for f, m in seen)
    ]
    assert not stale, "\n".join(stale)


def test_the_client_loads_neither_torch_nor_the_services():
    code = (
        "import sys, moemesh.client\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] in ('services', 'bench', 'tests'))\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing moemesh.client loaded {result.stdout.strip()}"
