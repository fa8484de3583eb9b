"""CI installs every extra (.ci/run): there, a test skipped for a missing package would hide a failure."""
import importlib.util
import os

import pytest

# What the optional extras bring (setup.py): the tests that need them skip where they are absent.
OPTIONAL_PACKAGES = ("transformers", "accelerate", "trl", "datasets", "tokenizers", "liger_kernel", "pytest_benchmark")


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI only: a developer may install only the base")
@pytest.mark.parametrize("package", OPTIONAL_PACKAGES)
def test_ci_has_every_optional_package(package):
    assert importlib.util.find_spec(package) is not None, f"CI's environment lacks {package}: see .ci/run"
