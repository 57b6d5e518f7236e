"""The offline demo and the console command."""

import pytest

pytest.importorskip("sklearn")

from sgfx.cli import main  # noqa: E402
from sgfx.demo import run_demo  # noqa: E402


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_demo_sparsegpt_beats_magnitude():
    rows, table = run_demo("2:4")
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"magnitude", "sparsegpt"}
    dense = by_method["sparsegpt"]["dense"]
    assert dense > 90.0  # the small CNN really trained
    # 450 test images: a few images (0.22 pp each) either way is noise; the reconstruction error is the signal
    assert by_method["sparsegpt"]["pruned"] >= by_method["magnitude"]["pruned"] - 1.0
    assert by_method["sparsegpt"]["drop"] < 2.0
    assert float(by_method["sparsegpt"]["mean rel. error"]) < float(by_method["magnitude"]["mean rel. error"])
    assert "| DigitsCNN" in table and "sparsegpt" in table


def test_cli_demo_prints_table(capsys):
    assert main(["demo", "--methods", "sparsegpt", "--pattern", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "sparsegpt" in out and "50% unstructured" in out


@pytest.mark.parametrize("bad", ["3:3", "1.5", "abc"])
def test_cli_rejects_bad_pattern(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--pattern", bad])
    assert exit_info.value.code == 2
    assert "accepted" in capsys.readouterr().err
