"""``python -m agent.cli ...``: the ``ambit`` command without the installed entry point."""

import sys

from agent.cli.main import main

sys.exit(main())
