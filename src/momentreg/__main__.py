import sys

from momentreg.cli import main

sys.exit(main())
