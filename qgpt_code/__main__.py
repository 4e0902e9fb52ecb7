import os
import sys

from qgpt_code.cli import main

code = main()
if sys.argv[1:2] in (["complete"], ["chat"]):
    # A finished one-shot command has nothing left to clean up: its output is flushed here and the
    # process ends without the interpreter's teardown (freeing the weights, joining idle thread pools),
    # which took a second or two after the last token.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(code)
sys.exit(code)
