import sys

from sd3.cli import main

sys.exit(main())
