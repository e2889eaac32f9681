"""Output folders that cannot work are refused in one line before anything is predicted (unit level)."""

from __future__ import annotations

import os

import pytest

from nnunet_ood.errors import OODInputError
from nnunet_ood.io.inputs import check_output_folder


def test_a_dangling_symlink_is_named_as_such(tmp_path):
    """It answered "(File exists)" after loading the model: os.makedirs cannot create a folder over the link."""
    link = tmp_path / "out"
    os.symlink(tmp_path / "missing_target", link)
    with pytest.raises(OODInputError, match=r"is a symlink to .*missing_target, which does not exist"):
        check_output_folder(str(link))
    assert not (tmp_path / "missing_target").exists()  # nothing created


def test_a_symlink_to_a_folder_is_a_folder(tmp_path):
    (tmp_path / "target").mkdir()
    link = tmp_path / "out"
    os.symlink(tmp_path / "target", link)
    check_output_folder(str(link))  # no error
