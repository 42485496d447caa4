"""CI runs what the README tells a newcomer to run: `.ci/run` installs the Debian packages the tests need, then runs
exactly the README's test command block (the fast tier first)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_ends_with_the_readmes_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (tests,) = [b for b in blocks if "-m pytest" in b]
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith(tests.rstrip()), tests
    assert tests.index("-m fast") < tests.index('-m "not fast and not slow"')
