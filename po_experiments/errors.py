"""Errors a user can act on. `run.py` prints these as one clear message instead of a traceback."""


class PoError(Exception):
    """Base class: something the user can fix (a config value, a missing file, no network)."""


class ConfigError(PoError):
    """An invalid config value; the message names the key."""


class DataError(PoError):
    """Malformed or unreachable data; the message names the file/dataset, the row index and the field."""


class ModelUnavailableError(PoError):
    """A model or tokenizer that cannot be loaded here (offline, wrong path)."""
