"""The interop matrix puts reports side by side: verdicts, variants, rules nobody exercised left out."""

from __future__ import annotations

import json
from pathlib import Path

from blkif_spec import matrix


def report(**verdicts: tuple[str, str | None]) -> dict:
    rules = [{"id": rid.replace("_", "-"), "level": "MUST", "summary": f"rule {rid}", "verdict": v,
              "variant": var} for rid, (v, var) in verdicts.items()]  # fmt: skip
    return {"targets": {"backend": {"name": "x", "kind": "live"}}, "rules": rules}


def test_cells_show_verdict_and_variant() -> None:
    m = matrix.build({
        "reference": report(SEG_1=("pass", None), DIV_1=("pass", "EOPNOTSUPP"), XK_1=("untested", None)),
        "qdisk": report(SEG_1=("fail", None), DIV_1=("pass", "ERROR"), XK_1=("untested", None)),
    })  # fmt: skip
    rows = {r["id"]: r["cells"] for r in m["rows"]}
    assert rows == {"SEG-1": {"reference": "pass", "qdisk": "FAIL"},
                    "DIV-1": {"reference": "pass: EOPNOTSUPP", "qdisk": "pass: ERROR"}}  # fmt: skip
    assert m["counts"]["qdisk"] == {"fail": 1, "pass": 1}  # over the rules some column exercised


def test_cli_writes_markdown_and_json(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report(SEG_1=("pass", None))))
    b.write_text(json.dumps(report(SEG_1=("skip", None))))
    assert matrix.main(["--out", str(tmp_path / "m"), f"ref={a}", f"blkback={b}"]) == 0
    md = (tmp_path / "m" / "matrix.md").read_text()
    assert "| SEG-1 | MUST | pass | skip | rule SEG_1 |" in md
    assert json.loads((tmp_path / "m" / "matrix.json").read_text())["columns"] == ["ref", "blkback"]


def test_a_missing_report_is_named(tmp_path: Path, capsys) -> None:
    assert matrix.main(["--out", str(tmp_path), f"blkback={tmp_path / 'none.json'}"]) == 2
    assert "blkback" in capsys.readouterr().err
