import sys

from crop.cli import main

sys.exit(main())
