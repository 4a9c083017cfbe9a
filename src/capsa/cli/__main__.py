import sys

from capsa.cli import main

sys.exit(main())
