"""labkit.homework: the story-length check of labs 01 and 02 passes a ~300-character story and fails others."""
from __future__ import annotations

import pytest

from labkit import homework
from labkit.notebook import LabCheckFailed


@pytest.mark.parametrize("n, ok", [(0, False), (249, False), (250, True), (300, True), (400, True), (401, False)])
def test_story_length_bounds(n, ok):
    got, why = homework.story_length("a" * n)
    assert got is ok and f"{n} characters" in why


def test_check_story_fails_for_a_real_model_and_says_why_for_a_generated_one(tiny_dir, tmp_path, capsys):
    real = tmp_path / "internlm2_5-1_8b-chat"  # any folder outside labkit's generated models
    real.mkdir()
    assert not homework.is_generated(real) and homework.is_generated(tiny_dir)
    assert homework.check_story("A" * 300, real)
    with pytest.raises(LabCheckFailed):
        homework.check_story("Too short.", real)
    assert homework.check_story("Too short.", tiny_dir) is False  # printed, not raised: random text
    assert "story length not checked: tiny-chat" in capsys.readouterr().out
