"""The README's examples run as written, and its set-up commands stay two."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def test_readme_has_two_setup_commands_first() -> None:
    commands = re.findall(r"^    \$ (.+)$", TEXT, re.M)
    assert len(commands) >= 2
    assert commands[0].startswith("pip install") and "gpubo stress" in commands[0]
    assert commands[1].startswith("pip install") and "pytest" in commands[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(
    index: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUBO_TRANSFER", raising=False)  # the README shows the default
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    out = capsys.readouterr().out
    # The block's own printed comments show what it prints; keep them true.
    for line in BLOCKS[index].splitlines():
        m = re.search(r"print\(mgr\)\s+# (<Manager .*>)", line)
        if m:
            assert m.group(1) in out
