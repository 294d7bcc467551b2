"""``plora bench train``: end-to-end training throughput (not implemented yet; a stub others may replace)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    print("plora bench train: not implemented yet")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
