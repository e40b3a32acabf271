"""The exceptions a user can cause."""


class UserError(Exception):
    """An error the user can fix (bad flag, missing data, unreachable handle).

    The CLI prints its message as one line and exits non-zero, without a traceback.
    The message must say what to do.
    """


class BelowMinAccuracy(UserError):
    """The trained model missed `--min_accuracy`: nothing exported, the run dir kept.

    Its own exit code lets a pipeline tell "trained fine, not good enough" from a bad flag.
    """

    exit_code = 3


class QuantizationDropTooLarge(UserError):
    """A TFLite export lost more accuracy than `--max_quantization_drop`: nothing written.

    The same exit code as BelowMinAccuracy: "converted fine, not good enough".
    """

    exit_code = 3
