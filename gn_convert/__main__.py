"""``python -m gn_convert``: the same as the ``gn-convert`` command."""

import sys

from gn_convert.cli import main

sys.exit(main())
