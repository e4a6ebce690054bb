import sys

from ctwatchd.cli import main

sys.exit(main())
