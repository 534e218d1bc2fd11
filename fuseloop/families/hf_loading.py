"""Loading a Hugging Face model from a local directory, strictly: a directory whose weights do not
match its config is refused with the keys that differ, where `from_pretrained` alone would only
warn and start those weights at random."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.nn as nn

from fuseloop.errors import UserError


class ModelDirectoryError(UserError):
    """A model directory that cannot be used as it is; the message says what is missing or wrong."""


def load_strict(cls, directory: Path) -> nn.Module:
    """`cls.from_pretrained(directory, local_files_only=True)`, refusing missing, unexpected or
    mis-shaped weights."""
    load = lambda **kw: cls.from_pretrained(str(directory), local_files_only=True, output_loading_info=True, **kw)  # noqa: E731
    try:
        with quiet_transformers():
            try:
                model, info = load()
            except RuntimeError as e:
                if "ignore_mismatched_sizes" not in str(e):
                    raise
                model, info = load(ignore_mismatched_sizes=True)  # only to name the mis-shaped weights
    except (OSError, ValueError, RuntimeError) as e:  # e.g. no weights file
        raise ModelDirectoryError(f"{directory}: the weights do not load with its config.json: {_first_line(e)}") from None
    problems = [f"{kind} {', '.join(sorted(map(str, keys))[:5])}{' ...' if len(keys) > 5 else ''}"
                for kind, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
                                   ("mis-shaped", [m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"]])) if keys]
    if problems or info["error_msgs"]:
        raise ModelDirectoryError(f"{directory}: the weights do not match its config.json: "
                                  f"{'; '.join(problems + [str(m) for m in info['error_msgs']])}")
    return model.eval()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' loading report and progress bars off: our own message says what matters."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
