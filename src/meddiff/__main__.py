import sys

from meddiff.cli import main

sys.exit(main())
