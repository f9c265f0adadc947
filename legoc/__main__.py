import sys

from legoc.cli import main

sys.exit(main())
