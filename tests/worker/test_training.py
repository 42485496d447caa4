"""Training a bundle is reproducible: the same data and seed give the same weights (the initial weights are
seeded too; torch's own seed differs in every process)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = """
import sys
from pathlib import Path
from worker.demo import train_tiny_bundle
from worker.method.bundle import ISLBundle
train_tiny_bundle(Path(sys.argv[1]), Path(sys.argv[2]))
print(ISLBundle.load(sys.argv[2]).version)
"""


def test_the_same_seed_trains_the_same_bundle_in_two_processes(phantom_dataset, tmp_path):
    versions = [subprocess.run([sys.executable, "-c", TRAIN, str(phantom_dataset), str(tmp_path / name)], cwd=ROOT,
                               capture_output=True, text=True, timeout=600, check=True).stdout.split()[-1]
                for name in ("a", "b")]
    assert versions[0].startswith("a-") and versions[1].startswith("b-")
    assert versions[0][2:] == versions[1][2:]  # the digest of both checkpoints
