from ftdeploy.doctor import python_supported


def test_python_versions_are_compared_as_numbers():
    assert python_supported((3, 11)) and python_supported((3, 13)) and python_supported((4, 0))
    # As strings ("3", "9") >= ("3", "11"): the old check let 3.9 through.
    assert not python_supported((3, 9)) and not python_supported((3, 10)) and not python_supported((2, 7))


def test_doctor_names_what_llama_cpp_was_built_for_and_what_this_cpu_lacks(monkeypatch, tmp_path):
    from ftdeploy import cpu

    monkeypatch.setattr(cpu.sys, "prefix", str(tmp_path))
    (tmp_path / cpu.STAMP).write_text("-DGGML_NATIVE=OFF -DGGML_AVX2=ON\n")
    monkeypatch.setattr(cpu, "llama_features", lambda: {"SSE3", "AVX", "AVX2", "FMA", "F16C", "LLAMAFILE"})
    ok, line = cpu.llama_report({"pni", "avx", "avx2", "fma", "f16c"})
    assert ok and line == "built for x86-64-v3 (AVX AVX2 F16C FMA SSE3): this CPU runs it", line
    monkeypatch.setattr(cpu, "llama_features", lambda: {"AVX", "AVX2", "FMA", "AVX512", "AMX_INT8"})
    ok, line = cpu.llama_report({"avx", "avx2", "fma", "avx512f"})
    assert not ok and "lacks AMX_INT8" in line and "scripts/setup.sh" in line
    ok, line = cpu.llama_report({"avx", "avx2", "fma", "avx512f", "amx_int8"})
    assert ok and "may advertise and not run" in line  # a host-native build works here, and says what it risks
    monkeypatch.setattr(cpu, "llama_features", lambda: "loading it killed the process with signal 4")
    ok, line = cpu.llama_report(set())
    assert not ok and "signal 4" in line


def test_doctor_names_what_ollama_was_built_for(tmp_path):
    from ftdeploy.cpu import X86_64_V3, ollama_report

    binary = tmp_path / "ollama"
    binary.write_text("")
    assert "publisher" in ollama_report(binary, set(X86_64_V3))[1]  # no stamp: not ours
    (tmp_path / "cpu-flags").write_text("-march=x86-64-v3\n")
    assert ollama_report(binary, set(X86_64_V3)) == (True, "built for x86-64-v3: this CPU runs it")
    ok, line = ollama_report(binary, set(X86_64_V3) - {"avx2"})
    assert not ok and "lacks avx2" in line
    (tmp_path / "cpu-flags").write_text("-march=native\n")
    assert "this build host only" in ollama_report(binary, set(X86_64_V3))[1]
