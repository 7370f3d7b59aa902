"""python -m tkd_core.study: the study (run.py), or with --estimate N its projection
(estimate.py)."""
import sys

from .estimate import estimate
from .run import parse_args, run_study


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
        if a.estimate:
            estimate(a, argv)
        else:
            run_study(a, argv)
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
