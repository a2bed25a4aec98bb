"""Long-tail learning via logit adjustment (Menon et al., 2020): the library behind train.py and eval.py.

The public API, for any model's logits (torch tensors or numpy arrays), is the one train.py and eval.py use:

    from la import log_prior, posthoc_adjust, choose_tau, balanced_accuracy
    log_pi = log_prior(train_counts)                                      # C training images per class
    tau, sweep = choose_tau(val_logits, val_labels, log_pi)               # tau chosen on held-out validation
    acc, ci95 = balanced_accuracy(posthoc_adjust(test_logits, log_pi, tau), test_labels)

and for training, logit_adjusted_ce(logits, targets, log_pi, tau) or the module LogitAdjustedLoss(train_counts, tau).
"""
import importlib
import os
import sys

# name -> the module that defines it; imported on first use, so `import la` stays light (no torch)
API = {"log_prior": "losses", "logit_adjusted_ce": "losses", "LogitAdjustedLoss": "losses",
       "posthoc_adjust": "losses", "choose_tau": "tausweep", "balanced_accuracy": "metrics",
       "balanced_ci95": "metrics"}
__all__ = ["UserError", "run_cli", *API]


def __getattr__(name):
    """The public API's functions, from the modules train.py and eval.py use (no second copy)."""
    if name not in API:
        raise AttributeError(f"module 'la' has no attribute {name!r}")
    return getattr(importlib.import_module(f"la.{API[name]}"), name)


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
