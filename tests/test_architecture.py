"""Dependencies point one way, read from the source (every import, function-level ones included): the networks and
the registration know nothing of HTTP, queues or databases; the API never imports torch, the networks or the
workers; the segmentation package never imports the registration (no cycle). The allowed segmentation modules of
the API are today's; moving image I/O into a package of its own (issue 35) shrinks the list, never grows it."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVING = {"fastapi", "starlette", "uvicorn", "h11", "celery", "kombu", "redis", "sqlalchemy", "alembic", "httpx",
           "prometheus_client", "pynetdicom"}
NETWORKS = {"torch", "monai", "voxelmorph", "neurite"}
# what the API reads files, DICOM, corrections and metrics with; none of them imports torch at module level
API_SEGMENTATION = {"segmentation.io", "segmentation.dicom", "segmentation.errors", "segmentation.files",
                    "segmentation.corrections", "segmentation.sequences", "segmentation.metrics"}


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


@pytest.mark.parametrize("package", ["segmentation", "registration"])
def test_the_networks_and_the_registration_know_nothing_of_serving(package):
    bad = offending(package, lambda n: top(n) not in SERVING | {"service", "worker"}
                    and not (package == "segmentation" and top(n) == "registration"))
    assert bad == [], "\n".join(bad)


def test_the_api_never_imports_the_networks_or_the_workers():
    def allowed(name: str) -> bool:
        if top(name) in NETWORKS | {"worker", "registration"}:
            return False
        return top(name) != "segmentation" or ".".join(name.split(".")[:2]) in API_SEGMENTATION

    bad = offending("service", allowed)
    assert bad == [], "\n".join(bad)


def test_the_rules_see_what_they_forbid(tmp_path, monkeypatch):
    """The checker itself: a forbidden import inside a function is found."""
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "bad.py").write_text("def f():\n    import torch\n    from worker.cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert offending("service", lambda n: top(n) not in NETWORKS | {"worker"}) == [
        "service/bad.py imports torch", "service/bad.py imports worker.cli"]
