import sys

import pytest

from ftdeploy.optional import MissingDependencyError, missing_dependency, require


def test_a_missing_optional_module_names_the_extra_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what an install without the train extra looks like
    with pytest.raises(MissingDependencyError) as err:
        require("torch", "training")
    assert str(err.value) == "training needs torch, which is not installed here: pip install 'ftdeploy[train]'"
    with pytest.raises(MissingDependencyError, match=r"needs llama-cpp-python, .*pip install 'ftdeploy\[train\]'"):
        monkeypatch.setitem(sys.modules, "llama_cpp", None)
        require("llama_cpp")
    with pytest.raises(MissingDependencyError, match=r"needs docker, .*: pip install docker$"):
        monkeypatch.setitem(sys.modules, "docker", None)
        require("docker")


def test_an_installed_package_with_a_broken_dependency_is_not_called_missing(tmp_path, monkeypatch):
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import a_dependency_it_lacks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("half_installed")
    assert err.value.name == "a_dependency_it_lacks"


def test_an_uncaught_import_error_of_a_known_module_becomes_the_same_message():
    converted = missing_dependency(ModuleNotFoundError("No module named 'transformers.models'",
                                                       name="transformers.models"))
    assert isinstance(converted, MissingDependencyError) and converted.extra == "train"
    assert missing_dependency(ModuleNotFoundError("x", name="some_unrelated_module")) is None
    assert missing_dependency(ValueError("not an import error")) is None
    assert require("json").dumps([1]) == "[1]"
