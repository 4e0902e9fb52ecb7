import sys

from qgpt_code.cli import main

sys.exit(main())
