"""``python -m piofvlm ...`` is the ``piofvlm`` command line."""

import sys

from piofvlm.cli import main

sys.exit(main())
