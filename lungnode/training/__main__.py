"""``python -m lungnode.training``: the training pipeline's command line (see :mod:`.cli`)."""

import sys

from lungnode.training.cli import main

sys.exit(main())
