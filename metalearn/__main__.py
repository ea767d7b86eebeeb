import sys

from metalearn.cli import main

sys.exit(main())
