# `python -m memr2 ...` works without an install, e.g. under `ray job submit --working-dir .`.
from memr2.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
