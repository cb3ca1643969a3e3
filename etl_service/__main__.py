"""`python -m etl_service`: the command line."""

import sys

from etl_service.service.cli import main

if __name__ == "__main__":
    sys.exit(main())
