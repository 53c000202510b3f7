"""`python -m dapft` (what `torchrun ... -m dapft finetune ...` runs)."""

from dapft.cli import run

run()
