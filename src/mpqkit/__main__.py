"""``python -m mpqkit`` (also what ``torchrun -m mpqkit`` runs)."""

import sys

from mpqkit.cli import main

sys.exit(main())
