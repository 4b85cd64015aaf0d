import sys

from octopusd.cli import main

sys.exit(main())
