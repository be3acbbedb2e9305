"""Domain errors and the exit codes the CLI maps them to (one place for both)."""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_CONFIG",
    "EXIT_MODEL",
    "EXIT_DEVICE",
    "EXIT_INPUT",
    "EXIT_OUTPUT",
    "EXIT_THRESHOLD",
    "EXIT_LOCKED",
    "EXIT_DATA",
    "EXIT_INTERRUPTED",
    "DinobatchError",
    "ConfigError",
    "ModelError",
    "DeviceError",
    "InputError",
    "OutputError",
    "LockedError",
    "DataError",
]

EXIT_OK = 0  # the run finished; unreadable images are rows with status "error", not a failure
EXIT_FAILED = 1  # an unexpected internal error (a bug): the traceback is logged
EXIT_USAGE = 2  # bad command line (Click's own code)
EXIT_CONFIG = 3  # bad configuration file or option value
EXIT_MODEL = 4  # the model cannot be loaded, imported or fetched
EXIT_DEVICE = 5  # the device or precision asked for is not available
EXIT_INPUT = 6  # the input folder or file is missing or cannot be opened
EXIT_OUTPUT = 7  # results could not be written (permissions, disk full)
EXIT_THRESHOLD = 8  # curate --fail-on: a share of flagged images passed its threshold (outputs written)
EXIT_LOCKED = 9  # another dinobatch run holds the output (the message names it); nothing was done
EXIT_DATA = 10  # an input table (predictions, manifest, decisions CSV) has wrong values; the message names rows and columns
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C / SIGINT); finished batches are kept


class DinobatchError(Exception):
    """Base of every error dinobatch reports to the user as a message, not a traceback."""

    exit_code = EXIT_FAILED


class ConfigError(DinobatchError):
    """A configuration file, option or environment value is invalid."""

    exit_code = EXIT_CONFIG


class ModelError(DinobatchError):
    """A model file is invalid, or a model cannot be built, imported or fetched."""

    exit_code = EXIT_MODEL


class DeviceError(DinobatchError):
    """The device or precision asked for is not available on this machine."""

    exit_code = EXIT_DEVICE


class InputError(DinobatchError):
    """The input folder or file cannot be used at all (a single bad image is a row instead)."""

    exit_code = EXIT_INPUT


class OutputError(DinobatchError):
    """Results cannot be written to the output folder."""

    exit_code = EXIT_OUTPUT


class LockedError(DinobatchError):
    """Another run holds the output folder (or manifest) this run would write."""

    exit_code = EXIT_LOCKED


class DataError(DinobatchError):
    """An input table or CSV opened fine but its contents are wrong: missing or mistyped columns,
    NaN or out-of-range values, labels that do not exist. The message names the rows and columns;
    nothing was written."""

    exit_code = EXIT_DATA
