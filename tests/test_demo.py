"""The README's first command: the demo trains, checkpoints and restores end to end."""

import zarrckpt
from zarrckpt import demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert demo.main([str(tmp_path), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "committed steps: [0, 1, 2]" in out
    assert "identical values: True" in out
    assert zarrckpt.list_steps(str(tmp_path / "training")) == [0, 1, 2]
