"""One error tree: the library raises these, only the command line turns them into messages and
exit codes (each class's `exit_code`)."""


class MergeError(Exception):
    """Base of every error caffe-bn-merge raises on purpose."""

    exit_code = 1


class InputError(MergeError):
    """The input files are unusable as given: the message says what, where and what to do."""

    exit_code = 2


class MismatchError(InputError):
    """The prototxt and the caffemodel do not describe the same net."""


class OutputError(MergeError):
    """An output path cannot be written as asked."""

    exit_code = 2


class VerifyError(MergeError):
    """The engine is missing or cannot run one of the models: the model converted but is not
    verified (exit 3, like a failed verification)."""

    exit_code = 3


class MergedRunError(VerifyError):
    """An engine ran the original model but not the merged one: a verdict on the merged model."""


class UsageError(MergeError):
    """The command cannot start as asked: bad manifest, colliding or unsafe outputs, ..."""

    exit_code = 2
