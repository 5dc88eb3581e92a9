import sys

from lmadda.cli import main

sys.exit(main())
