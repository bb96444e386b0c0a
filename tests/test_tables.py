import pytest

from clusiam.errors import DataError
from clusiam.tables import read_table


def test_a_slide_table_is_read_with_excels_byte_order_mark_and_refused_when_malformed(tmp_path):
    excel = tmp_path / "excel.csv"
    excel.write_bytes("slide,label\r\nnormal_001,normal\r\ntumor_001,tumor\r\n".encode("utf-8-sig"))
    assert read_table(excel, ("slide", "label")) == {"normal_001": "normal", "tumor_001": "tumor"}
    cases = {
        "header.csv": ("slide,label\n", "has a header but no rows"),
        "short.csv": ("slide,label\nnormal_001,normal\ntumor_001\n", "line 3: not the header's 2 fields"),
        "long.csv": ("slide,label\nnormal_001,normal,extra\n", "line 2: not the header's 2 fields"),
        "columns.csv": ("name,label\nnormal_001,normal\n", "needs columns slide, label; missing slide"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{tmp_path / name}.*{message}"):
            read_table(tmp_path / name, ("slide", "label"))
    (tmp_path / "utf16.csv").write_text("slide,label\nnormal_001,normal\n", encoding="utf-16")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_table(tmp_path / "utf16.csv", ("slide", "label"))
