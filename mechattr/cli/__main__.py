"""`python -m mechattr.cli`: the same as the `mechattr` command."""

import sys

from mechattr.cli import main

sys.exit(main())
