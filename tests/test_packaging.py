"""Install and test-run noise (issue 11 item 8): the license is an SPDX string, so setuptools prints no
deprecation banner on every install, and warnings raised inside torch (not by swaa) are filtered."""

import pathlib
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11+")
def test_the_license_is_an_spdx_string_and_setuptools_reads_it():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    # the TOML table form `{ text = ... }` is what setuptools warns about at every build
    assert data["project"]["license"] == "Apache-2.0"
    # SPDX strings need setuptools >= 77 (PEP 639)
    (requirement,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(requirement.split(">=")[1].split(".")[0]) >= 77


def test_torch_script_method_deprecation_is_filtered_but_ours_are_not():
    message = "`torch.jit.script_method` is deprecated. Please switch to `torch.compile` or `torch.export`."
    with warnings.catch_warnings(record=True) as seen:
        # as torch.utils.mkldnn triggers it when torch.compile imports inductor
        warnings.warn_explicit(message, DeprecationWarning, "_script.py", 365, module="torch.jit._script")
        # the same words from anywhere else still show
        warnings.warn_explicit(message, DeprecationWarning, "layers.py", 1, module="swaa.layers.base")
    assert [w.filename for w in seen] == ["layers.py"]
