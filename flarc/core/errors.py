"""User-facing errors: one line that names the file, node, tensor or option at fault. Anything
else raised inside flarc is a bug, and keeps its traceback."""


class FlarcError(Exception):
    """Bad input or an unusable environment; the CLI prints it on one line and exits 2."""

    exit_code = 2

    def __str__(self) -> str:
        # A one-line message even when the cause carried newlines.
        return " ".join(super().__str__().split())


class ModelError(FlarcError):
    """The ONNX model cannot be read, is unsafe, or has nothing flarc can work on."""


class DataError(FlarcError):
    """Calibration data does not fit the model (names, shapes, dtypes, values)."""


class BackendError(FlarcError):
    """A requested backend (TensorRT, CUDA, ...) is not available here."""


class OptionError(FlarcError, ValueError):
    """An option value, or a combination of options, that cannot work (also a ValueError)."""
