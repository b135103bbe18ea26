import sys

from dinokit.cli import main

sys.exit(main())
