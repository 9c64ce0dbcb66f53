import sys

from torchdiff.cli import main

sys.exit(main())
