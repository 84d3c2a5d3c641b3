"""``python -m jasper_consumer.tools.mixin``: see the package docstring."""

import sys

from . import main

sys.exit(main())
