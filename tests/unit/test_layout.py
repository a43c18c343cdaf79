"""The source root `platform/` must never shadow the standard library's `platform` module."""

import importlib
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_platform_is_the_standard_library():
    import platform

    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert platform.python_version()  # the real module's API


def test_platform_dir_is_a_source_root_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    honed = importlib.import_module("honed")
    assert Path(honed.__file__).parent == ROOT / "platform" / "honed"


def test_public_surface_is_short():
    import honed

    assert len(honed.__all__) <= 12
    for name in honed.__all__:
        assert hasattr(honed, name)
