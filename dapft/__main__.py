"""`python -m dapft` (what `torchrun ... -m dapft finetune ...` runs)."""

import sys

try:
    from dapft.cli import run
except KeyboardInterrupt:  # Ctrl-C while the command line itself loads
    print("interrupted", file=sys.stderr)
    sys.exit(130)

run()
