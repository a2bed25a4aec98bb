"""Long-tail learning via logit adjustment (Menon et al., 2020): the library behind train.py and eval.py."""
import os
import sys


class UserError(Exception):
    """A problem with the user's input: entry points print it as one line and exit non-zero."""


def run_cli(main):
    """Run an entry point's main(argv): a UserError becomes one 'error:' line on stderr and exit status 2.

    Under torchrun every rank may hit the same error; one line per node is printed (a problem may be
    one node's alone), naming the rank when it is not rank 0.
    """
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            rank = os.environ.get("RANK", "0")
            print(f"error: {'' if rank == '0' else f'rank {rank}: '}{e}", file=sys.stderr)
        sys.exit(2)
