"""The offline demo and the console command."""

import pytest

pytest.importorskip("sklearn")

from sgfx.cli import main  # noqa: E402
from sgfx.cli.demo import run_demo  # noqa: E402


@pytest.mark.filterwarnings("ignore:sgfx.*left dense")
def test_demo_shows_sparsegpt_beating_magnitude_beyond_noise():
    rows, text = run_demo()
    by_key = {(row["pattern"], row["method"]): row for row in rows}
    assert set(by_key) == {(p, m) for p in ("2:4", "1:4") for m in ("magnitude", "sparsegpt")}
    assert rows[0]["_dense"] > 95.0  # the small CNN really trained
    for pattern in ("2:4", "1:4"):
        difference, half_width = by_key[(pattern, "sparsegpt")]["_vs_first"]
        assert difference > half_width > 0  # ahead of magnitude by more than the 95 % interval: not noise
        assert float(by_key[(pattern, "sparsegpt")]["mean rel. error"]) < \
            float(by_key[(pattern, "magnitude")]["mean rel. error"])
    assert by_key[("2:4", "sparsegpt")]["_dense"] - by_key[("2:4", "sparsegpt")]["_accuracy"] < 1.0
    assert "898 held-out images" in text and "95 % interval" in text
    assert "| conv2   |" in text and "| conv1   | dense" in text  # the per-layer error table


def test_cli_demo_prints_tables(capsys):
    assert main(["demo", "--methods", "sparsegpt", "--patterns", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| 50% unstructured | sparsegpt |" in out and "Per-layer reconstruction error" in out


@pytest.mark.parametrize("bad", ["3:3", "1.5", "abc"])
def test_cli_rejects_bad_pattern(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--patterns", bad])
    assert exit_info.value.code == 2
    assert "accepted" in capsys.readouterr().err
