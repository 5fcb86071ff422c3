import sys

from momentreg.cli.main import main

sys.exit(main())
