"""`python -m faceforge.cli` (and `torchrun -m faceforge.cli`): the `faceforge` command."""

import sys

from faceforge.cli.main import main

sys.exit(main())
