"""Dependencies point one way, read from the source (every import, function-level ones included).

    imaging  <-  segmentation, registration  <-  isl  <-  worker
       ^                                                    |
       +----------------------  service  <------------------+
                      jobstore  <-  service, worker

`imaging` (files, DICOM, metrics) knows no other package of the project; the networks and the registration know
nothing of HTTP, queues, databases or the method; the method (`isl`) knows nothing of the service or the workers;
the API (`service`) never imports torch, the networks, the method or the workers, and of `imaging` never the
checkpoint files (torch). No cycle between the packages."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imaging", "segmentation", "registration", "isl", "jobstore", "worker", "service")
SERVING = {"fastapi", "starlette", "uvicorn", "h11", "celery", "kombu", "redis", "sqlalchemy", "alembic", "httpx",
           "prometheus_client", "pynetdicom"}
NETWORKS = {"torch", "monai", "voxelmorph", "neurite"}
# which project packages each package may import (itself aside)
MAY_IMPORT = {
    "imaging": set(),
    "segmentation": {"imaging"},
    "registration": {"imaging"},
    "isl": {"imaging", "segmentation", "registration"},
    "jobstore": set(),
    "service": {"imaging", "jobstore"},
    "worker": {"imaging", "segmentation", "registration", "isl", "jobstore", "service"},
}


def imports(package: str) -> dict[str, set[str]]:
    """Module file -> every module it imports (absolute imports, at any depth of the file)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def offending(package: str, allowed) -> list[str]:
    return [f"{path} imports {name}" for path, names in imports(package).items() for name in sorted(names)
            if not allowed(name)]


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_packages_below_it(package):
    bad = offending(package, lambda n: top(n) not in PACKAGES or top(n) == package or top(n) in MAY_IMPORT[package])
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("package", ["imaging", "segmentation", "registration", "isl"])
def test_files_networks_and_method_know_nothing_of_serving(package):
    bad = offending(package, lambda n: top(n) not in SERVING)
    assert bad == [], "\n".join(bad)


def test_imaging_imports_torch_only_for_checkpoint_files():
    bad = [line for line in offending("imaging", lambda n: top(n) not in NETWORKS)
           if not line.startswith("imaging/checkpoint.py ")]
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("package", ["service", "jobstore"])
def test_the_api_and_the_job_store_never_import_the_networks(package):
    bad = offending(package, lambda n: top(n) not in NETWORKS and n != "imaging.checkpoint")
    assert bad == [], "\n".join(bad)


def test_no_cycle_between_packages():
    """The allowed imports form layers: following them from any package never comes back to it."""
    def reach(package, seen):
        for nxt in MAY_IMPORT[package]:
            assert nxt != seen[0], f"cycle: {' -> '.join(seen + [nxt])}"
            reach(nxt, seen + [nxt])
    for package in PACKAGES:
        reach(package, [package])


def test_the_rules_see_what_they_forbid(tmp_path, monkeypatch):
    """The checker itself: a forbidden import inside a function is found, and a cycle in the rules is."""
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "bad.py").write_text("def f():\n    import torch\n    from worker.cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert offending("service", lambda n: top(n) not in NETWORKS | {"worker"}) == [
        "service/bad.py imports torch", "service/bad.py imports worker.cli"]
    monkeypatch.setitem(MAY_IMPORT, "imaging", {"isl"})
    with pytest.raises(AssertionError, match="cycle: imaging -> isl -> (.* -> )?imaging"):
        test_no_cycle_between_packages()


def test_no_module_over_400_lines_and_no_function_over_60():
    """Rooms that each do one job stay small: a module past 400 lines or a function past 60 is split, not grown."""
    too_long = []
    for package in (*PACKAGES, "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            where = path.relative_to(ROOT)
            if len(source.splitlines()) > 400:
                too_long.append(f"{where}: {len(source.splitlines())} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                        node.end_lineno - node.lineno + 1 > 60:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == [], "\n".join(too_long)
