import sys

from dictlearn.cli import main

sys.exit(main())
