"""Errors caused by the user's input: a recipe, data, a checkpoint or model file, a run directory.

Every one derives from `LTRecipesError`, which train.py, validate.py and the tools catch once to log the message
(it names the key, file or value at fault) and exit with code 2 instead of a traceback. Each also keeps the builtin
base it has always had (ValueError, RuntimeError, FileNotFoundError, OSError), so callers that catch those still do.
Errors of the code itself (a broken invariant, a misuse of the API) stay plain builtins and keep their traceback.
This module imports only the standard library, so the recipe checks that raise `ConfigError` run before torch is
imported.
"""
from __future__ import annotations

import pickle

# Lines of torch.load's errors that advise retrying with weights_only=False, which would run code from the file.
_TORCH_ADVICE = ("weights_only", "Re-running", "arbitrary code", "Please file an issue", "Check the documentation")


class LTRecipesError(Exception):
    """Bad user input; the message says what to change. train.py, validate.py and the tools exit with code 2."""


class ConfigError(LTRecipesError, ValueError):
    """A recipe or override names an unknown key or gives a bad value."""


class DataError(LTRecipesError, ValueError):
    """Bad data input; the message names the file, line, key, class or value at fault."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data root, list/json file or image that does not exist."""


class ModelError(LTRecipesError, ValueError):
    """A recipe's model section or a checkpoint that cannot build or load the model (names the key or file)."""


class LossError(LTRecipesError, ValueError):
    """A loss that cannot be built from the recipe or applied to the given inputs."""


class OptimizerError(LTRecipesError, ValueError):
    """The recipe's optimizer cannot be created here (e.g. a CUDA-only optimizer on the CPU)."""


class CheckpointError(LTRecipesError, RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated, or made by a different run set-up."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file that torch.load(weights_only=True) cannot read: truncated, corrupt, or holding code."""


def read_error(e: BaseException) -> str:
    """torch.load's error in one line, without its advice to retry with weights_only=False (that would run code):
    what the checkpoint and model loaders say about a file they cannot read."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    kept = [ln for ln in lines if not any(a in ln for a in _TORCH_ADVICE)]
    what = "holds pickled Python objects, which are never loaded" if isinstance(e, pickle.UnpicklingError) \
        else "is corrupt or truncated"
    return f"{what} ({type(e).__name__}: {'; '.join(kept) or 'no detail'})"


class OutputError(LTRecipesError, OSError):
    """A run directory or output file that cannot be written (permissions, a read-only file system, a full disk); the
    message names the path and the system's reason, and for a full disk the space needed."""


class NonFiniteError(LTRecipesError, RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row (lower the learning rate)."""


class AnalysisError(LTRecipesError, ValueError):
    """A run directory or results tree that the analysis tools cannot read; the message names the file."""
