"""`python -m sspect ...` (what Slicer runs with PythonSlicer)."""
import sys

from .cli import main

sys.exit(main())
