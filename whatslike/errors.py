"""One exception root. Their errors (bad input from a client or provider) and our errors
(a bug or a broken backend) are different types with different outcomes."""


class WhatslikeError(Exception):
    """Root of every error Whatslike raises on purpose."""


class ConfigError(WhatslikeError):
    """A setting has a bad value; the message names the setting. Stops the start."""


class MalformedEvent(WhatslikeError):
    """An event on the bus cannot be decoded. Retrying cannot help: dead-letter it."""


class BackendUnavailable(WhatslikeError):
    """A store, bus or fan-out backend cannot be reached. Retriable."""
