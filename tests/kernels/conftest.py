"""Shared set-up of the kernel tests: run the Triton side of each op, on CUDA or on Triton's CPU interpreter."""

import importlib
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def triton_path():
    """A function that switches ``lowbit.kernels`` modules to Triton for the rest of the test module.

    Without CUDA, Triton's interpreter must be on when a kernel is *defined*, so the modules are (re)imported after
    ``TRITON_INTERPRET=1`` is set. ``autotune=False`` pins one launch configuration per kernel (fast CPU tests).
    Returns the device the tests should use.
    """
    with pytest.MonkeyPatch.context() as mp:

        def enable(*modules: str, autotune: bool = True) -> str:
            mp.setenv("LOWBIT_KERNELS", "triton")
            if not autotune:
                mp.setenv("LOWBIT_AUTOTUNE", "0")
            if not torch.cuda.is_available():
                mp.setenv("TRITON_INTERPRET", "1")
                for name in modules:
                    importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
            return "cuda" if torch.cuda.is_available() else "cpu"

        yield enable
