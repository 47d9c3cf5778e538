import sys

from specwire.cli import main

sys.exit(main())
