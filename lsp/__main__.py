"""`python -m qgpt_code.lsp`: the language server over stdio (the same as `qgpt lsp`)."""

import sys

from qgpt_code.lsp.command import main

if __name__ == "__main__":
    sys.exit(main())
