"""Long-tail learning via logit adjustment (Menon et al., 2020): the library behind train.py and eval.py."""


class UserError(Exception):
    """A problem with the user's input: entry points print it as one line and exit non-zero."""
