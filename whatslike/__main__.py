"""`python -m whatslike` is the `whatslike` command."""

import sys

from whatslike.cli import main

sys.exit(main())
