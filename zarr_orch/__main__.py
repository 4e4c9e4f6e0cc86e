"""``python -m zarr_orch``: the zarr-orch command line, for environments without its script."""

import sys

from zarr_orch.cli import main

if __name__ == "__main__":
    sys.exit(main())
