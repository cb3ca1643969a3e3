"""`python -m etl_service.settings --env-example | --reference`: the settings' generated text."""

import sys

from etl_service.settings.docgen import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
