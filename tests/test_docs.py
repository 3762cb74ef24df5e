"""Every example in a public docstring runs and prints what it says (examples that need files are marked +SKIP)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dn2

MODULES = sorted(m.name for m in pkgutil.walk_packages(dn2.__path__, "dn2."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional extra that is not installed
        pytest.skip(f"{name} needs an optional extra: {e}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
