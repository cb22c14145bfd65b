"""``python -m flsplit.cli``: the ``flsplit`` command."""

import sys

from flsplit.cli import main

sys.exit(main())
