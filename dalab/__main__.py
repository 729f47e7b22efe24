"""``python -m dalab ...`` = ``dalab ...``; also what ``torchrun --nproc_per_node N -m dalab run ...`` starts."""

import sys

from dalab.cli import main

sys.exit(main())
