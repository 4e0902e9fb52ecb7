"""Errors a user can act on. The CLI prints their message as one line, without a traceback."""


class QGPTError(Exception):
    """Base of every error meant for the user rather than for a developer."""


class CheckpointError(QGPTError):
    """A checkpoint is missing, unreadable, or does not match the architecture; the message names the file."""


class TokenizerError(QGPTError):
    """A tokenizer file is missing, unreadable, or does not fit the model."""


class PromptTooLongError(QGPTError):
    """A prompt does not fit in the context window."""

    def __init__(self, n_prompt: int, limit: int):
        super().__init__(
            f"prompt is {n_prompt} tokens but the context window holds {limit} "
            "(shorten it, or raise --max-seq-len up to the model's context)"
        )
        self.n_prompt = n_prompt
        self.limit = limit


class EmptyPromptError(QGPTError):
    """A prompt with no tokens to condition on."""
