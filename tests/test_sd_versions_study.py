"""App. E / Fig. 20 study: --quick builds tiny random SD pipelines offline and writes the version-pair RP table."""

import pytest
from study_helpers import assert_png, read_csv

from lightning_repro.studies import sd_versions

pytestmark = pytest.mark.filterwarnings("ignore")


def test_quick_writes_the_version_rp_table_and_the_different_seed_baseline(tmp_path, capsys, one_thread):
    rows = sd_versions.main(["--quick", "--out", str(tmp_path)])
    header, csv_rows = read_csv(tmp_path / "sd_versions.csv")
    assert header == sd_versions.COLUMNS and len(csv_rows) == len(rows) == 6 + 4
    pairs = [r for r in rows if r["pairing"] == sd_versions.SAME]
    base = [r for r in rows if r["pairing"] == sd_versions.SHIFTED]
    assert [(r["model_a"], r["model_b"]) for r in pairs] == [
        ("v1-1", "v1-2"), ("v1-1", "v1-3"), ("v1-1", "v1-4"), ("v1-2", "v1-3"), ("v1-2", "v1-4"), ("v1-3", "v1-4")]
    assert [r["model_a"] for r in base] == ["v1-1", "v1-2", "v1-3", "v1-4"]
    assert all(r["descriptor"] == "pixel" and r["seeds"] == 6 and 0 <= r["rp"] <= 1 for r in rows)
    # neighbouring versions (small UNet perturbations) agree more at one seed than one version at two seeds
    assert min(r["mean_similarity"] for r in pairs) > max(r["mean_similarity"] for r in base)
    out = capsys.readouterr().out
    assert "RP matrix:" in out and "same prompt, different seeds (seed k vs k+1): v1-1=" in out
    assert_png(tmp_path / "sd_versions.png")
    assert sorted(p.name for p in (tmp_path / "tiny_pipelines").iterdir()) == ["v1-1", "v1-2", "v1-3", "v1-4"]
