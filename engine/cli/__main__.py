"""`python -m protobooth.engine.cli`: the command line without the installed `protobooth` script."""
import sys

from . import main

sys.exit(main())
