"""labkit.show's tables for notebooks: lmdeploy Responses (labs 01, 05) and refusals of bad input (labs 04, 05)."""
from __future__ import annotations

from labkit import kvcache, show


def test_responses_table_has_the_response_fields_and_extra_columns():
    from lmdeploy.messages import Response

    batch = [Response(text="a" * 80, generate_token_len=5, input_token_len=20, finish_reason="length",
                      token_ids=[1, 2, 3, 4, 5], index=0),
             Response(text="short", generate_token_len=2, input_token_len=18, finish_reason="stop",
                      token_ids=[7, 8], index=1)]
    table = show.responses_table(batch, text_chars=10, image=["x", "y"])
    assert list(table.columns) == ["image", "text", *show.RESPONSE_FIELDS, "len(token_ids)"]
    assert table["text"].tolist() == ["a" * 10 + "...", "short"]
    assert table["len(token_ids)"].tolist() == [5, 2] and table["finish_reason"].tolist() == ["length", "stop"]
    assert len(show.responses_table(batch[1])) == 1  # one Response is a one-row table


def test_refusals_keep_refused_inputs_and_report_accepted_ones(capsys):
    got = show.refusals({"ratio 1.5": lambda: kvcache.check_ratio(1.5), "ratio 0.4": lambda: kvcache.check_ratio(0.4),
                         "policy 3": lambda: kvcache.check_policy(3)})
    assert set(got) == {"ratio 1.5", "policy 3"} and "(0, 1]" in got["ratio 1.5"]
    out = capsys.readouterr().out
    assert "ratio 0.4: ACCEPTED (expected a refusal)" in out and "policy 3: quant_policy must be one of" in out
