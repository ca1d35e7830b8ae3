"""errors.py: a broken optional package (bitsandbytes) is named with its fix, not left as diffusers' import chain."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from lcm_live.errors import broken_package_message

CUDA_SETUP = "CUDA Setup failed despite GPU being available"


@pytest.fixture
def broken_bitsandbytes(tmp_path):
    """A bitsandbytes that fails at import, as the 2023 wheels do on a machine whose CUDA they do not know."""
    package = tmp_path / "site" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise RuntimeError({CUDA_SETUP!r})\n")
    info = tmp_path / "site" / "bitsandbytes-0.41.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.41.1\n")
    return tmp_path / "site"


def _diffusers_style_failure(site) -> RuntimeError:
    """What diffusers' lazy modules raise: "Failed to import ..." from the package's own error."""
    sys.path.insert(0, str(site))
    try:
        try:
            importlib.import_module("bitsandbytes")
        except RuntimeError as inner:
            try:
                raise RuntimeError("Failed to import diffusers.loaders.single_file because of the following "
                                   "error (look up to see its traceback):\n" + str(inner)) from inner
            except RuntimeError as outer:
                return outer
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("bitsandbytes", None)
    raise AssertionError("the broken package imported")


def test_the_broken_package_is_named_with_its_own_error_and_the_fix(broken_bitsandbytes):
    message = broken_package_message(_diffusers_style_failure(broken_bitsandbytes))
    assert message is not None
    assert message.startswith(f"the installed bitsandbytes fails to import ({CUDA_SETUP})")
    assert "pip install -U 'bitsandbytes>=0.45'" in message and "pip uninstall bitsandbytes" in message


def test_other_failures_are_not_blamed_on_a_package(tmp_path):
    try:
        raise RuntimeError("out of memory")
    except RuntimeError as exc:
        assert broken_package_message(exc) is None
    # An error from a call into the package once imported (a kernel out of memory) is not a broken install.
    package = tmp_path / "site" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def matmul():\n    raise RuntimeError('CUDA out of memory')\n")
    sys.path.insert(0, str(tmp_path / "site"))
    try:
        module = importlib.import_module("bitsandbytes")
        try:
            module.matmul()
        except RuntimeError as exc:
            assert broken_package_message(exc) is None
        else:
            raise AssertionError("matmul did not raise")
    finally:
        sys.path.remove(str(tmp_path / "site"))
        sys.modules.pop("bitsandbytes", None)


@pytest.mark.slow
def test_the_cli_says_which_package_to_fix_instead_of_a_traceback(broken_bitsandbytes, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken_bitsandbytes), *sys.path])}
    result = subprocess.run([sys.executable, "-c", "import sys; from lcm_live.cli import main; sys.exit(main())",
                             "generate", "--model", "builtin:shapes", "a red circle", "--output",
                             str(tmp_path / "out.png")], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: the installed bitsandbytes fails to import ({CUDA_SETUP})" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()
