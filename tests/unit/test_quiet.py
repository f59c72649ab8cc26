"""Library deprecation warnings stay off the user's terminal; ftdeploy's own warnings do not."""

from __future__ import annotations

import subprocess
import sys


def test_a_librarys_future_warning_is_silenced_and_ours_is_not():
    code = (
        "import warnings, types, sys\n"
        "from ftdeploy.quiet import quiet_libraries\n"
        "quiet_libraries()\n"
        "for name in ('transformers.modeling_utils', 'peft', 'ftdeploy.stages.merge', 'transformersx'):\n"
        "    g = {'__name__': name}\n"
        "    exec(\"import warnings\\nwarnings.warn('from ' + __name__, FutureWarning)\", g)\n"
    )
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "from transformers.modeling_utils" not in proc.stderr and "from peft" not in proc.stderr
    assert "from ftdeploy.stages.merge" in proc.stderr and "from transformersx" in proc.stderr
