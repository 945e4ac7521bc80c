"""Where the repository's files are, for a test file at any depth under tests/.

Test files import this instead of counting ``Path(__file__).parents``, so moving a test
between folders changes no path. It is importable from every folder because pytest's default
"prepend" import mode puts tests/, the root conftest's folder, on ``sys.path``.
"""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONFIGS = ROOT / "examples" / "configs"
