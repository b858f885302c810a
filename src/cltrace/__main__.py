"""`python -m cltrace` (and `torchrun -m cltrace`) runs the command line."""

from cltrace.cli import main

main()
