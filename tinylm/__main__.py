"""`python -m tinylm` is the same as the `tinylm` command."""

import sys

from tinylm.cli import main

sys.exit(main())
