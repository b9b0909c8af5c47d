import sys

from openalign.cli import main

sys.exit(main())
