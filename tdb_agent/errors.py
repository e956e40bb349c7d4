"""Errors a user can cause. Each message says what was wrong and what is valid; the MCP
server turns them into tool errors the model can read and act on."""


class TdbError(ValueError):
    """Base class of every user-facing error."""


class UnknownComponent(TdbError):
    pass


class UnknownSite(TdbError):
    pass


class TokenizationError(TdbError):
    """A target or distractor that is not exactly one token."""


class PromptTooLong(TdbError):
    pass


class ModelNotFound(TdbError):
    pass


class Cancelled(TdbError):
    """The caller cancelled a long operation; it stopped at the next layer or batch."""


class UnsupportedModel(TdbError):
    """A model family (or configuration) no adapter can run and decompose exactly."""
