"""The golden data travels with the repository: a missing case fails, it never skips."""

import pytest

from conftest import GOLDEN_DIR, golden_cases, golden_path


def test_a_missing_golden_file_fails_the_test_instead_of_skipping_it():
    with pytest.raises(pytest.fail.Exception, match="no_such_case.npz missing"):
        golden_path("torch/no_such_case.npz")


def test_a_case_pattern_matching_nothing_is_an_error():
    with pytest.raises(FileNotFoundError, match="no golden file matches"):
        golden_cases("torch/no_such_family_*.npz")


def test_every_golden_folder_has_its_readme_and_index():
    folders = [p for p in GOLDEN_DIR.iterdir() if p.is_dir()]
    assert folders, f"no golden data under {GOLDEN_DIR}"
    for folder in folders:
        assert (folder / "README.md").is_file(), folder
        assert (folder / "index.json").is_file() or any(folder.glob("*.pt")), folder
