"""``benchmarks/host_breakdown.py``: an inserted-lesion evaluation split by host scan."""

import pytest


@pytest.fixture(scope="module")
def breakdown(load_benchmark):
    return load_benchmark("host_breakdown")


def test_each_host_is_scored_against_its_own_false_positives(breakdown, tmp_path, capsys):
    rows = ["seriesuid,coordX,coordY,coordZ,diameter_mm,status"]
    rows += [f"A-ins1000-{c},{10 * c},0,0,6,nodule" for c in (0, 1)]
    rows += ["B-ins1000-2,0,0,0,6,nodule", "B-ins1000-3,0,0,0,6,nodule"]
    (tmp_path / "annotations.csv").write_text("\n".join(rows) + "\n")
    cands = ["seriesuid,coordX,coordY,coordZ,probability",
             "A-ins1000-0,0,0,0,0.9", "A-ins1000-1,10,0,0,0.8",  # host A: both lesions above everything
             "B-ins1000-2,0,0,0,0.5", "B-ins1000-3,50,50,50,0.7"]  # host B: one hit, below a false positive
    (tmp_path / "candidates.csv").write_text("\n".join(cands) + "\n")
    assert breakdown.main([str(tmp_path / "annotations.csv"), str(tmp_path / "candidates.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("A: 2 copies, 2 lesions, 2 hit at any score") and out[0].endswith("CPM 1.000")
    # B: 1 false positive over 2 copies (0.5 per scan) outranks its one hit: 0 up to 0.25, then 0.5 from 0.5 on
    assert out[1].startswith("B: 2 copies, 2 lesions, 1 hit at any score") and "0.25: 0.000, 0.5: 0.500" in out[1]
    assert out[1].endswith(f"CPM {(0 + 0 + 0.5 * 5) / 7:.3f}")


def test_a_scan_that_is_no_copy_is_a_one_line_error(breakdown, tmp_path, capsys):
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm,status\n"
    (tmp_path / "annotations.csv").write_text(header + "scan1,0,0,0,6,nodule\n")
    (tmp_path / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\n")
    assert breakdown.main([str(tmp_path / "annotations.csv"), str(tmp_path / "candidates.csv")]) == 1
    assert capsys.readouterr().err.strip() == "error: scan1 is not a copy of a lesion data set (no '-ins' in its name)"
