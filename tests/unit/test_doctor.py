from ftdeploy.doctor import python_supported


def test_python_versions_are_compared_as_numbers():
    assert python_supported((3, 11)) and python_supported((3, 13)) and python_supported((4, 0))
    # As strings ("3", "9") >= ("3", "11"): the old check let 3.9 through.
    assert not python_supported((3, 9)) and not python_supported((3, 10)) and not python_supported((2, 7))
