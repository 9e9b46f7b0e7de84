"""Import ONNX Runtime's on-device training API without torch.

`onnxruntime/training/__init__.py` imports modules that need torch and onnx, which a device does not have.
The API modules themselves need only numpy and the C extension, so an empty package module with the right
`__path__` is registered first (reference/ort-training.md §7.3).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


def load_training_api() -> types.ModuleType:
    """The `onnxruntime.training.api` module; ImportError with a fix if the runtime is missing."""
    _register_shim()
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            "onnxruntime-training is not installed; run: pip install --no-deps onnxruntime-training-cpu==1.19.2 "
            "(x86_64 / macOS arm64 only; on Linux aarch64 use the torch backend)"
        ) from exc
    try:
        api = importlib.import_module("onnxruntime.training.api")
    except ImportError as exc:
        raise ImportError(
            f"onnxruntime {getattr(onnxruntime, '__version__', '?')} has no training API ({exc}); plain "
            "'onnxruntime' may have overwritten the training build: "
            "pip install --force-reinstall --no-deps onnxruntime-training-cpu==1.19.2"
        ) from exc
    onnxruntime.set_default_logger_severity(3)
    return api


def _register_shim() -> None:
    """Stand in for `onnxruntime.training` before onnxruntime is first imported.

    Doing it first matters: onnxruntime's import-time build validation tries `training.ortmodule`, which
    imports torch whenever torch is installed (+200 MB RSS in every agent on a builder machine). Marking
    ortmodule as absent makes that probe fail fast, as it does on a real device.
    """
    if "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return  # reported by the import below
    package = types.ModuleType("onnxruntime.training")
    package.__path__ = [os.path.join(os.path.dirname(spec.origin), "training")]
    sys.modules["onnxruntime.training"] = package
    sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]


def load_inference_runtime() -> types.ModuleType:
    """The `onnxruntime` module for inference only (`InferenceSession`): the plain package or the training build.

    The training build's import-time probe would otherwise import its training modules (and onnx, and torch where
    installed); the same stand-in as for training keeps prediction to the inference API alone.
    """
    _register_shim()
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("onnxruntime is not installed; for prediction alone: pip install onnxruntime (it has "
                          "Linux x86_64 and aarch64 wheels); never install it beside onnxruntime-training") from exc
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime
