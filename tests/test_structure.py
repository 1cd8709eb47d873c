"""The module map of docs/architecture.md holds: no import cycle, pure modules stay pure."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1] / "malaria_ray"
PURE = ("config", "schema", "storage", "sources", "corpus", "preprocess", "ingest", "metrics", "outputs", "writer",
        "manifests", "lease", "scoringrun", "checkpoint", "logs", "faults", "resources", "trainrun", "train", "score",
        "cli", "runtime", "model", "detect", "segment", "annotations", "synth_fields", "overlay", "listing", "reads",
        "backends", "nights", "nightpage", "tracking")


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


def _contracts() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Each contract: the module(s) that own its names, and the names that no other module may
    spell as a literal. Words that legitimately name several things ("image", "label", "uri",
    "threshold", "image_size") are left out: they are checked where a contract owns them alone."""
    from malaria_ray import schema as s
    from malaria_ray import storage

    return {
        "class names": (("schema",), s.CLASS_NAMES),
        "model artifact files": (("schema",), (s.MODEL_FILE, s.CONTRACT_FILE, s.H5_FILE)),
        "model.json keys": (("schema",), (s.KEY_RESIZE, s.KEY_CHANNELS, s.KEY_CLASSES, s.KEY_POSITIVE_INDEX,
                                          s.KEY_THRESHOLD_SOURCE, s.KEY_VAL_SENSITIVITY, s.KEY_VAL_SPECIFICITY)),
        "listing columns": (("schema",), (s.COL_KIND, s.COL_VERSION)),
        "raw input rows": (("schema",), (s.COL_LABEL_HINT, s.COL_SLIDE_HINT, s.COL_PATIENT_HINT, s.COL_SOURCE_VERSION)),
        "container suffixes": (("schema",), s.TAR_SUFFIXES + s.ZIP_SUFFIXES),
        "error kinds": (("schema",), (s.COL_ERROR_KIND, s.ERROR_TRANSIENT, s.ERROR_PERMANENT)),
        "entries a listing does not open": (("schema",), (s.KIND_DANGLING, s.KIND_LINK_LOOP, s.KIND_SPECIAL,
                                                           s.KIND_FOLDER_LINK, s.KIND_UNLISTABLE)),
        "validation predictions": (("schema",), (s.COL_VAL_PROB,)),
        "run counts": (("schema",), (s.COUNT_SCORED, s.COUNT_ERRORS)),
        "roll-up columns": (("schema",), (s.COL_FRAC_POS, s.COL_FRAC_LOW, s.COL_FRAC_HIGH, s.COL_CALL, s.COL_N_PRED_POS,
                                          s.COL_N_LABEL_POS, s.COL_N_LABEL_NEG, s.COL_SUM_PROB)),
        "object-store schemes": (("storage",), (storage.S3A,)),
    }


def _literals(module: pathlib.Path) -> set[str]:
    """String constants of a module, docstrings left out."""
    tree = ast.parse(module.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


def test_every_name_of_a_contract_is_spelled_only_by_its_owner():
    literals = {p.stem: _literals(p) for p in PKG.glob("*.py")}
    for contract, (owners, names) in _contracts().items():
        for module, found in literals.items():
            if module in owners:
                continue
            again = sorted(set(names) & found)
            assert not again, f"{module}.py spells {again} of the {contract} (owner: {', '.join(owners)})"


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
