"""The module map of docs/architecture.md holds: no import cycle, pure modules stay pure."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1] / "malaria_ray"
PURE = ("config", "schema", "storage", "sources", "corpus", "preprocess", "ingest", "metrics", "outputs", "writer",
        "manifests", "lease", "scoringrun", "checkpoint", "logs", "faults", "resources", "trainrun", "train", "score",
        "cli", "runtime", "model")


def _imports(module: pathlib.Path, top_level_only: bool) -> set[str]:
    """Project modules ``module`` imports (at module level only, or anywhere)."""
    tree = ast.parse(module.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("malaria_ray"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("malaria_ray.") and (PKG / f"{n.split('.')[1]}.py").exists()}
    return found - {module.stem}


def test_no_import_cycle_between_modules():
    """Counting imports inside functions too: a cycle there is still two modules that need each other."""
    graph = {p.stem: _imports(p, top_level_only=False) for p in PKG.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_scoring_driver_and_its_commit_protocol_read_a_function_at_a_time():
    """No function over 80 lines in the scoring driver and the modules of its output root, and no
    module of the package over 420 lines (one job each; docs/architecture.md)."""
    for module in ("score", "outputs", "writer", "manifests", "lease", "scoringrun"):
        tree = ast.parse((PKG / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{module}.{node.name}: {node.end_lineno - node.lineno} lines"
    sizes = {p.stem: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_importing_modules_loads_neither_ray_nor_tensorflow():
    code = (f"import sys, importlib\nfor m in {PURE!r}: importlib.import_module('malaria_ray.' + m)\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_credentials_and_signatures_never_reach_config_files():
    from malaria_ray import storage
    from malaria_ray.config import ScoreConfig, TrainConfig

    assert storage.redact("https://b.s3.amazonaws.com/w.h5?X-Amz-Signature=abc&X-Amz-Credential=K") == \
        "https://b.s3.amazonaws.com/w.h5?<redacted>"
    assert storage.redact("s3://AKIA:secret@bucket/x.tar#a.png") == "s3://<redacted>@bucket/x.tar#a.png"
    assert storage.redact("/data/night #3/a.png") == "/data/night #3/a.png"
    text = ScoreConfig(input="s3://u:pw@b/in", model="https://h/m.keras?token=SECRET", output="/o").to_json()
    text += TrainConfig(data="/d", output="/o", weights="https://h/w.h5?X-Amz-Signature=SECRET").to_json()
    assert "SECRET" not in text and "pw@" not in text and "<redacted>" in text


def test_gpu_check_script_dry_run_commands_are_valid():
    """bench/gpu_check.sh --dry-run prints what it would run on a GPU machine: every training
    command parses with the CLI, and every bench flag exists in that bench's --help."""
    import pathlib
    import shlex

    from malaria_ray import cli

    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": "/tmp"})
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    trains = [c for c in commands if c[1:4] == ["-m", "malaria_ray.cli", "train"]]
    assert [(cli.parse_train(c[4:])[0].precision, cli.parse_train(c[4:])[0].xla) for c in trains] == [
        ("bf16", False), ("fp32", False), ("bf16", True)]
    assert all(cli.parse_train(c[4:])[0].use_gpu for c in trains)
    benches = [c for c in commands if c[1].startswith("bench/")]
    assert len(benches) == 2
    for c in benches:
        helptext = subprocess.run([sys.executable, str(repo / c[1]), "--help"], capture_output=True, text=True,
                                  timeout=120, cwd=repo).stdout
        for flag in (a for a in c[2:] if a.startswith("--")):
            assert flag in helptext, (c[1], flag)
